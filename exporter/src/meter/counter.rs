//! Cumulative energy counters → per-interval deltas, with wrap-around and resets.
//!
//! Every real meter exposes a counter that only grows: powercap's `energy_uj`
//! (it wraps at `max_energy_range_uj`), the perf `power` PMU's count (the
//! kernel widens the 32-bit MSR to 64 bits, so it does not wrap), NVML's
//! total-energy counter in mJ (64-bit, restarts at a driver reload).
//!
//! A reading below the previous one is either a wrap or a reset, and the two
//! look alike. The rule here: a backwards move is a wrap when the energy the
//! wrap implies, `range - prev + cur`, is at most half the counter's range;
//! otherwise it is a reset and the interval counts zero. Readers sample
//! counters many times per wrap (powercap's range is ~262 kJ, four minutes at
//! 1 kW; intervals are seconds), so a genuine wrap implies a small delta,
//! while a counter restarting from zero from the middle of its range implies
//! more than half a range. A reset from near the top of the range is
//! indistinguishable from a wrap and is counted as one: the error is at most
//! the few joules between the last reading and the top.
//!
//! `range` is the counter's modulus: the counter counts `0, 1, …, range-1, 0`.
//! For powercap that is `max_energy_range_uj` as the kernel names it (the
//! kernel computes it as `(2^32 - 1) × unit`, so the true modulus is one RAPL
//! unit — at most 61 µJ — larger: at most 61 µJ per wrap are not seen, less
//! than a billionth of the energy between two wraps).

/// What one reading of a counter meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterStep {
    /// The first reading: nothing to compare with, zero energy.
    Baseline,
    /// The counter grew by this many units.
    Advanced(u64),
    /// The counter wrapped; this many units passed (`range - prev + cur`).
    Wrapped(u64),
    /// The counter moved backwards by something other than a wrap: counted as
    /// zero; `cur` is the new baseline.
    Reset { previous: u64, current: u64 },
}

impl CounterStep {
    /// Units of energy this step contributes (zero for a baseline or reset).
    pub fn units(self) -> u64 {
        match self {
            CounterStep::Advanced(units) | CounterStep::Wrapped(units) => units,
            CounterStep::Baseline | CounterStep::Reset { .. } => 0,
        }
    }
}

/// How a counter wraps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wrap {
    /// 64-bit counters that do not wrap in a machine's lifetime (2^64 µJ is
    /// 585 years at 1 kW): any backwards move is a reset.
    Never,
    /// The counter counts modulo this many units (`2^bits` for a counter of
    /// `bits` bits, up to 2^64).
    Modulo(u128),
}

impl Wrap {
    /// A counter of `bits` bits (1..=64).
    pub fn bits(bits: u32) -> Wrap {
        assert!(
            (1..=64).contains(&bits),
            "counter width must be 1..=64 bits, got {bits}"
        );
        Wrap::Modulo(1u128 << bits)
    }

    /// A counter that wraps at `range` units (powercap's `max_energy_range_uj`).
    /// A range of zero means the file said nothing useful: treat as never wrapping.
    pub fn at(range: u64) -> Wrap {
        if range == 0 {
            Wrap::Never
        } else {
            Wrap::Modulo(u128::from(range))
        }
    }
}

/// Classify one reading against the previous one.
pub fn counter_step(previous: u64, current: u64, wrap: Wrap) -> CounterStep {
    if current >= previous {
        return CounterStep::Advanced(current - previous);
    }
    match wrap {
        Wrap::Never => CounterStep::Reset { previous, current },
        Wrap::Modulo(range) => {
            let (previous_wide, current_wide) = (u128::from(previous), u128::from(current));
            if previous_wide >= range || current_wide >= range {
                // A reading outside the counter's range cannot come from a wrap.
                return CounterStep::Reset { previous, current };
            }
            let wrapped = range - previous_wide + current_wide;
            if wrapped <= range / 2 {
                // range <= 2^64, so half of it fits in u64.
                CounterStep::Wrapped(wrapped as u64)
            } else {
                CounterStep::Reset { previous, current }
            }
        }
    }
}

/// One cumulative counter and its last reading.
#[derive(Clone, Debug)]
pub struct EnergyCounter {
    wrap: Wrap,
    last: Option<u64>,
}

impl EnergyCounter {
    pub fn new(wrap: Wrap) -> EnergyCounter {
        EnergyCounter { wrap, last: None }
    }

    /// The range can change when a zone is re-read after a rescan.
    pub fn set_wrap(&mut self, wrap: Wrap) {
        self.wrap = wrap;
    }

    pub fn wrap(&self) -> Wrap {
        self.wrap
    }

    /// The last reading, if any.
    pub fn last(&self) -> Option<u64> {
        self.last
    }

    /// Record a reading and say what it meant.
    pub fn advance(&mut self, reading: u64) -> CounterStep {
        let step = match self.last {
            None => CounterStep::Baseline,
            Some(previous) => counter_step(previous, reading, self.wrap),
        };
        self.last = Some(reading);
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_reading_is_a_baseline() {
        let mut counter = EnergyCounter::new(Wrap::at(1000));
        assert_eq!(counter.advance(500), CounterStep::Baseline);
        assert_eq!(counter.advance(700), CounterStep::Advanced(200));
    }

    #[test]
    fn wrap_adds_range_minus_previous_plus_current() {
        assert_eq!(
            counter_step(900, 100, Wrap::at(1000)),
            CounterStep::Wrapped(200)
        );
        assert_eq!(
            counter_step(u64::MAX - 9, 10, Wrap::bits(64)),
            CounterStep::Wrapped(20)
        );
    }

    #[test]
    fn backwards_move_larger_than_half_a_range_is_a_reset() {
        assert_eq!(
            counter_step(300, 10, Wrap::at(1000)),
            CounterStep::Reset {
                previous: 300,
                current: 10
            }
        );
        assert_eq!(
            counter_step(300, 10, Wrap::Never),
            CounterStep::Reset {
                previous: 300,
                current: 10
            }
        );
        // A reading beyond the declared range is not a wrap either.
        assert_eq!(
            counter_step(1500, 10, Wrap::at(1000)),
            CounterStep::Reset {
                previous: 1500,
                current: 10
            }
        );
    }

    #[test]
    fn reset_counts_zero_and_becomes_the_new_baseline() {
        let mut counter = EnergyCounter::new(Wrap::at(1000));
        counter.advance(400);
        assert_eq!(counter.advance(5).units(), 0);
        assert_eq!(counter.advance(25), CounterStep::Advanced(20));
    }

    proptest! {
        /// For any counter width and any sequence of true increments (each at
        /// most half the range, the sampling rule's limit), the summed deltas
        /// equal the true energy.
        #[test]
        fn summed_deltas_equal_true_energy(
            bits in 1u32..=64,
            start_fraction in 0.0f64..1.0,
            increment_fractions in proptest::collection::vec(0.0f64..=1.0, 0..200),
        ) {
            let modulus = 1u128 << bits;
            let half = (modulus / 2) as u64;
            let start = ((modulus - 1) as f64 * start_fraction) as u128 % modulus;
            let mut counter = EnergyCounter::new(Wrap::bits(bits));
            let mut true_total: u128 = 0;
            let mut measured_total: u128 = 0;
            counter.advance(start as u64);
            for fraction in increment_fractions {
                let increment = ((half as f64) * fraction) as u64;
                let increment = increment.min(half);
                true_total += u128::from(increment);
                let reading = ((start + true_total) % modulus) as u64;
                let step = counter.advance(reading);
                prop_assert!(!matches!(step, CounterStep::Reset { .. }), "{step:?}");
                measured_total += u128::from(step.units());
            }
            prop_assert_eq!(measured_total, true_total);
        }

        /// The same for arbitrary (non power of two) ranges such as powercap's.
        #[test]
        fn summed_deltas_equal_true_energy_for_any_range(
            range in 2u64..=u64::MAX,
            start in any::<u64>(),
            increments in proptest::collection::vec(any::<u64>(), 0..200),
        ) {
            let half = range / 2;
            let start = start % range;
            let mut counter = EnergyCounter::new(Wrap::at(range));
            counter.advance(start);
            let (mut true_total, mut measured_total) = (0u128, 0u128);
            for increment in increments {
                let increment = increment % (half + 1);
                true_total += u128::from(increment);
                let reading = ((u128::from(start) + true_total) % u128::from(range)) as u64;
                measured_total += u128::from(counter.advance(reading).units());
            }
            prop_assert_eq!(measured_total, true_total);
        }
    }
}
