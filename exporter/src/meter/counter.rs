//! Cumulative energy counters → per-interval deltas, with wrap-around, resets
//! and readings no device could produce.
//!
//! Every real meter exposes a counter that only grows: powercap's `energy_uj`
//! (it wraps at `max_energy_range_uj`), the perf `power` PMU's count (the
//! kernel widens the 32-bit MSR to 64 bits, so it does not wrap), NVML's
//! total-energy counter in mJ (64-bit, restarts at a driver reload).
//!
//! # The rule
//!
//! Between two readings `prev` and `cur` of a counter of modulus `range`, the
//! energy that passed is `forward + k × range` for some number of wraps
//! `k >= 0`, where `forward` is `cur - prev` when the counter grew and
//! `range - prev + cur` (a wrap) when it went down. Which `k` is decided with
//! the most the meter can have counted in the elapsed time, `most` = the
//! meter's maximum power × the elapsed time (see `meter/mod.rs` for where the
//! maximum power comes from):
//!
//! - the counter grew and `forward > most`: no device draws that much; the
//!   reading is **rejected** ([`CounterStep::Implausible`]). This is the
//!   Kepler failure of 9 kW on a 35 W PC, or 300 kW when a VM boots.
//! - it went down and the wrap `forward > most`: not a wrap the device could
//!   make, so the counter restarted: a **reset**.
//! - `forward + range <= most`: the gap was long enough for the counter to
//!   wrap once more (or several times) unseen, and nothing says how often; the
//!   reading is **rejected** ([`CounterStep::Ambiguous`]) rather than guessed.
//! - otherwise exactly one `k` fits (0), and `forward` is counted: a gap
//!   longer than half a range (a stalled loop, a suspended VM) is counted in
//!   full, neither dropped as a "reset" nor counted twice.
//!
//! After every reading, counted or not, the reading becomes the baseline, so
//! the next interval is measured normally. A rejected interval's energy is
//! **unknown**: it is not added to any counter, and the meter counts it in
//! `ergon_meter_rejected_readings_total{source,reason}` so the gap is
//! visible; a reset is counted there too (reason `counter_reset`).
//!
//! The elapsed time is the time since the counter's *previous reading*, not
//! one sampling interval: a zone that could not be read for N intervals (a
//! GPU lost for a while, a counter file that read garbage) has a counter
//! that kept counting, and the step of its next reading covers all N + 1
//! intervals. Judged against one interval's maximum, that real energy would
//! be rejected as above the zone's power; judged against the whole span it
//! is counted, and the gap rule above stays exact (a span long enough for an
//! unseen wrap is ambiguous). [`EnergyCounter::elapse`] keeps that time per
//! counter; every sample calls it, read or not, and a reading restarts it.
//!
//! Where no elapsed time is known (`most` is `None`: the first interval of a
//! loop), the older half-range rule decides: a backwards move is a wrap when
//! it implies at most half the counter's range, else a reset. Readers sample
//! counters many times per wrap (powercap's range is ~262 kJ, four minutes at
//! 1 kW; intervals are seconds), so a genuine wrap implies a small delta.
//!
//! A reset from near the top of the range is indistinguishable from a wrap
//! and is counted as one: the error is at most the few joules between the
//! last reading and the top.
//!
//! `range` is the counter's modulus: the counter counts `0, 1, …, range-1, 0`.
//! For powercap that is `max_energy_range_uj` as the kernel names it (the
//! kernel computes it as `(2^32 - 1) × unit`, so the true modulus is one RAPL
//! unit — at most 61 µJ — larger: at most 61 µJ per wrap are not seen, less
//! than a billionth of the energy between two wraps).

use crate::units::Nanos;

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
    /// The counter moved by more `units` than the meter can count in the
    /// elapsed time (`most`): rejected, zero counted, the reading is the new
    /// baseline.
    Implausible { units: u64, most: u64 },
    /// The elapsed time allows one wrap more than the readings show (`units`
    /// or `units + range`, or more): rejected rather than guessed.
    Ambiguous { units: u64, most: u64 },
}

impl CounterStep {
    /// Units of energy this step contributes (zero for a baseline, a reset or
    /// a rejected reading).
    pub fn units(self) -> u64 {
        match self {
            CounterStep::Advanced(units) | CounterStep::Wrapped(units) => units,
            CounterStep::Baseline
            | CounterStep::Reset { .. }
            | CounterStep::Implausible { .. }
            | CounterStep::Ambiguous { .. } => 0,
        }
    }

    /// Why this reading's energy is not counted, for
    /// `ergon_meter_rejected_readings_total`; `None` when it is counted (or
    /// is a baseline, which has no energy to count).
    pub fn rejection(self) -> Option<super::Rejection> {
        match self {
            CounterStep::Baseline | CounterStep::Advanced(_) | CounterStep::Wrapped(_) => None,
            CounterStep::Reset { .. } => Some(super::Rejection::CounterReset),
            CounterStep::Implausible { .. } => Some(super::Rejection::AboveMaxPower),
            CounterStep::Ambiguous { .. } => Some(super::Rejection::AmbiguousGap),
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

/// Classify one reading against the previous one. `most` is the most units
/// the meter can have counted since `previous` (its maximum power × the
/// elapsed time), `None` where no elapsed time is known. See the module doc.
pub fn counter_step(previous: u64, current: u64, wrap: Wrap, most: Option<u64>) -> CounterStep {
    let range = match wrap {
        Wrap::Never => None,
        Wrap::Modulo(range) => Some(range),
    };
    let forward: u128 = if current >= previous {
        u128::from(current - previous)
    } else {
        let Some(range) = range else {
            return CounterStep::Reset { previous, current };
        };
        let (previous_wide, current_wide) = (u128::from(previous), u128::from(current));
        if previous_wide >= range || current_wide >= range {
            // A reading outside the counter's range cannot come from a wrap.
            return CounterStep::Reset { previous, current };
        }
        let wrapped = range - previous_wide + current_wide;
        let possible = match most {
            Some(most) => wrapped <= u128::from(most),
            None => wrapped <= range / 2,
        };
        if !possible {
            return CounterStep::Reset { previous, current };
        }
        wrapped
    };
    // forward < range <= 2^64 when wrapped, and a difference of u64s otherwise.
    let units = forward as u64;
    let Some(most) = most else {
        return if current >= previous {
            CounterStep::Advanced(units)
        } else {
            CounterStep::Wrapped(units)
        };
    };
    if forward > u128::from(most) {
        return CounterStep::Implausible { units, most };
    }
    if range.is_some_and(|range| forward + range <= u128::from(most)) {
        return CounterStep::Ambiguous { units, most };
    }
    if current >= previous {
        CounterStep::Advanced(units)
    } else {
        CounterStep::Wrapped(units)
    }
}

/// One cumulative counter, its last reading and the time since.
#[derive(Clone, Debug)]
pub struct EnergyCounter {
    wrap: Wrap,
    last: Option<u64>,
    /// Time since `last` was read: the intervals in which the counter could
    /// not be read add up, so the next step is judged over all of them.
    since_last: Nanos,
}

impl EnergyCounter {
    pub fn new(wrap: Wrap) -> EnergyCounter {
        EnergyCounter {
            wrap,
            last: None,
            since_last: Nanos(0),
        }
    }

    /// Another sampling interval of `elapsed` passed, whether or not this
    /// counter is read in it; returns the time since its last reading, the
    /// span the next reading's step covers (for the `most` of
    /// [`EnergyCounter::advance`]). Call it once per sample, before reading.
    pub fn elapse(&mut self, elapsed: Nanos) -> Nanos {
        if self.last.is_some() {
            self.since_last = Nanos(self.since_last.0.saturating_add(elapsed.0));
        }
        self.since_last
    }

    /// Time since the last reading, as [`EnergyCounter::elapse`] last returned it.
    pub fn since_last(&self) -> Nanos {
        self.since_last
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

    /// Record a reading and say what it meant; `most` as in [`counter_step`].
    /// The reading is the next baseline whatever it meant.
    pub fn advance(&mut self, reading: u64, most: Option<u64>) -> CounterStep {
        let step = match self.last {
            None => CounterStep::Baseline,
            Some(previous) => counter_step(previous, reading, self.wrap, most),
        };
        self.last = Some(reading);
        self.since_last = Nanos(0);
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::limits::most_units;
    use crate::units::Watts;
    use proptest::prelude::*;

    /// A counter not read for five intervals: its next step spans six, and
    /// is judged against six intervals' maximum; a reading restarts the span.
    #[test]
    fn the_span_since_the_last_reading_covers_intervals_not_read() {
        let second = Nanos(1_000_000_000);
        let max = Watts(70.0);
        let mut counter = EnergyCounter::new(Wrap::at(262_143_328_850));
        // Before the baseline there is no span.
        assert_eq!(counter.elapse(second), Nanos(0));
        assert_eq!(counter.advance(1_000_000, None), CounterStep::Baseline);
        for _ in 0..5 {
            counter.elapse(second);
        }
        let span = counter.elapse(second);
        assert_eq!(span, Nanos(6_000_000_000));
        // 300 J at 50 W over six seconds: counted, though above 70 J.
        assert_eq!(
            counter.advance(301_000_000, most_units(max, span, 1e-6)),
            CounterStep::Advanced(300_000_000)
        );
        assert_eq!(counter.since_last(), Nanos(0));
        // One interval again: 100 J is above 70 W.
        let span = counter.elapse(second);
        assert_eq!(span, second);
        assert!(matches!(
            counter.advance(401_000_000, most_units(max, span, 1e-6)),
            CounterStep::Implausible { .. }
        ));
        // A rejected reading is the baseline too: the span restarts.
        assert_eq!(counter.elapse(second), second);
    }

    /// The gap rule with the whole span: an outage long enough for the
    /// counter to wrap unseen is ambiguous, not a small delta.
    #[test]
    fn an_outage_long_enough_for_an_unseen_wrap_is_ambiguous() {
        let second = Nanos(1_000_000_000);
        // A 100 J range, a 70 W zone: a wrap every 1.4 s at full power.
        let mut counter = EnergyCounter::new(Wrap::at(100_000_000));
        counter.advance(10_000_000, None);
        let mut span = Nanos(0);
        for _ in 0..3 {
            span = counter.elapse(second);
        }
        let step = counter.advance(20_000_000, most_units(Watts(70.0), span, 1e-6));
        assert!(matches!(step, CounterStep::Ambiguous { .. }), "{step:?}");
    }

    #[test]
    fn first_reading_is_a_baseline() {
        let mut counter = EnergyCounter::new(Wrap::at(1000));
        assert_eq!(counter.advance(500, None), CounterStep::Baseline);
        assert_eq!(counter.advance(700, None), CounterStep::Advanced(200));
    }

    #[test]
    fn wrap_adds_range_minus_previous_plus_current() {
        assert_eq!(
            counter_step(900, 100, Wrap::at(1000), None),
            CounterStep::Wrapped(200)
        );
        assert_eq!(
            counter_step(u64::MAX - 9, 10, Wrap::bits(64), None),
            CounterStep::Wrapped(20)
        );
    }

    #[test]
    fn backwards_move_larger_than_half_a_range_is_a_reset() {
        assert_eq!(
            counter_step(300, 10, Wrap::at(1000), None),
            CounterStep::Reset {
                previous: 300,
                current: 10
            }
        );
        assert_eq!(
            counter_step(300, 10, Wrap::Never, None),
            CounterStep::Reset {
                previous: 300,
                current: 10
            }
        );
        // A reading beyond the declared range is not a wrap either.
        assert_eq!(
            counter_step(1500, 10, Wrap::at(1000), None),
            CounterStep::Reset {
                previous: 1500,
                current: 10
            }
        );
    }

    #[test]
    fn reset_counts_zero_and_becomes_the_new_baseline() {
        let mut counter = EnergyCounter::new(Wrap::at(1000));
        counter.advance(400, None);
        assert_eq!(counter.advance(5, None).units(), 0);
        assert_eq!(counter.advance(25, None), CounterStep::Advanced(20));
    }

    #[test]
    fn a_gap_longer_than_half_a_range_counts_in_full_when_one_wrap_fits() {
        // 950 units in a gap where the meter could count at most 1200: one
        // wrap fits, two do not. The half-range rule alone called it a reset.
        assert_eq!(
            counter_step(100, 50, Wrap::at(1000), Some(1200)),
            CounterStep::Wrapped(950)
        );
        assert_eq!(
            counter_step(100, 800, Wrap::at(1000), Some(1200)),
            CounterStep::Advanced(700)
        );
        // A wrap the meter could not have made in the time is a reset.
        assert_eq!(
            counter_step(300, 10, Wrap::at(1000), Some(500)),
            CounterStep::Reset {
                previous: 300,
                current: 10
            }
        );
    }

    #[test]
    fn a_gap_that_allows_another_wrap_is_rejected_not_guessed() {
        let step = counter_step(100, 200, Wrap::at(1000), Some(2500));
        assert_eq!(
            step,
            CounterStep::Ambiguous {
                units: 100,
                most: 2500
            }
        );
        assert_eq!(step.units(), 0);
        assert_eq!(
            step.rejection(),
            Some(crate::meter::Rejection::AmbiguousGap)
        );
        // A counter that never wraps has no such ambiguity.
        assert_eq!(
            counter_step(100, 200, Wrap::Never, Some(2500)),
            CounterStep::Advanced(100)
        );
    }

    #[test]
    fn a_jump_beyond_the_maximum_power_is_rejected_and_the_baseline_moves_on() {
        let mut counter = EnergyCounter::new(Wrap::Never);
        counter.advance(1_000, Some(100));
        // 100 times what the meter can count in the interval.
        let step = counter.advance(11_000, Some(100));
        assert_eq!(
            step,
            CounterStep::Implausible {
                units: 10_000,
                most: 100
            }
        );
        assert_eq!(step.units(), 0);
        assert_eq!(
            step.rejection(),
            Some(crate::meter::Rejection::AboveMaxPower)
        );
        assert_eq!(
            counter.advance(11_060, Some(100)),
            CounterStep::Advanced(60)
        );
    }

    proptest! {
        /// The gap rule: for any range, start, maximum and true energy within
        /// the maximum, the step counts exactly the true energy, or rejects
        /// it as ambiguous exactly when one more wrap would also fit. It
        /// never counts a wrong amount and never calls a true gap a reset.
        #[test]
        fn gap_rule_counts_the_true_energy_or_rejects_an_ambiguous_gap(
            range in 2u64..=(u64::MAX / 8),
            start in any::<u64>(),
            most_fraction in 0.0f64..=4.0,
            true_fraction in 0.0f64..=1.0,
        ) {
            let start = start % range;
            let most = ((range as f64) * most_fraction) as u64;
            let true_units = ((most as f64) * true_fraction) as u64;
            let true_units = true_units.min(most);
            let reading = ((u128::from(start) + u128::from(true_units)) % u128::from(range)) as u64;
            let step = counter_step(start, reading, Wrap::at(range), Some(most));
            let ambiguous = u128::from(true_units % range) + u128::from(range) <= u128::from(most);
            if ambiguous {
                prop_assert!(matches!(step, CounterStep::Ambiguous { .. }), "{step:?}");
            } else {
                prop_assert!(
                    matches!(step, CounterStep::Advanced(_) | CounterStep::Wrapped(_)),
                    "{step:?}"
                );
                prop_assert_eq!(step.units(), true_units);
            }
        }

        /// Whatever the readings, nothing beyond what the meter can count in
        /// the elapsed time is ever counted.
        #[test]
        fn nothing_above_the_maximum_is_ever_counted(
            previous in any::<u64>(),
            current in any::<u64>(),
            range in prop_oneof![Just(None), (2u64..=u64::MAX).prop_map(Some)],
            most in any::<u64>(),
        ) {
            let wrap = range.map_or(Wrap::Never, Wrap::at);
            let step = counter_step(previous, current, wrap, Some(most));
            prop_assert!(step.units() <= most, "{step:?}");
            let counted = matches!(step, CounterStep::Advanced(_) | CounterStep::Wrapped(_));
            prop_assert_eq!(step.rejection().is_some(), !counted);
        }

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
            counter.advance(start as u64, None);
            for fraction in increment_fractions {
                let increment = ((half as f64) * fraction) as u64;
                let increment = increment.min(half);
                true_total += u128::from(increment);
                let reading = ((start + true_total) % modulus) as u64;
                let step = counter.advance(reading, None);
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
            counter.advance(start, None);
            let (mut true_total, mut measured_total) = (0u128, 0u128);
            for increment in increments {
                let increment = increment % (half + 1);
                true_total += u128::from(increment);
                let reading = ((u128::from(start) + true_total) % u128::from(range)) as u64;
                measured_total += u128::from(counter.advance(reading, None).units());
            }
            prop_assert_eq!(measured_total, true_total);
        }
    }
}
