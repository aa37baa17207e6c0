//! The power model: table lookup from a host's cpuinfo, known watts from
//! known utilisation, the online fit, and fit files.

mod meter_support;

use ergon::meter::model::{ModelFit, OnlineFit, load_coefficients};
use ergon::meter::{
    MeterConfig, MeterContext, MeterError, ModelCoefficients, RaplInterface, detect,
};
use ergon::units::{Domain, Joules, Nanos, Watts};
use meter_support::SysFixture;

const CASCADE_LAKE_CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\n\
model name\t: Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz\nstepping\t: 7\n\n\
processor\t: 1\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\nstepping\t: 7\n";

fn model_only(fixture: &SysFixture, cpuinfo: &str) -> MeterConfig {
    MeterConfig {
        host_sys: fixture.path().to_path_buf(),
        host_proc: fixture.write_cpuinfo(cpuinfo),
        rapl: RaplInterface::Auto,
        nvml: false,
        hwmon: false,
        ..MeterConfig::default()
    }
}

#[test]
fn a_host_without_meters_gets_the_model_with_its_cpu_row() {
    let fixture = SysFixture::new();
    let mut meters = detect(&model_only(&fixture, CASCADE_LAKE_CPUINFO));
    assert_eq!(meters.len(), 1);
    let model = &mut meters[0];
    assert_eq!(
        (model.source(), model.is_estimate(), model.domains()),
        ("model", true, vec![Domain::Package])
    );
    // Cascade Lake: 0.64 W idle, 3.97 W busy per vCPU; two vCPUs in cpuinfo.
    assert_eq!(model.idle_power(), Some(Watts(2.0 * 0.64)));

    let ctx = MeterContext {
        elapsed: Nanos(10_000_000_000),
        cpu_utilisation: Some(0.25),
        cpus: 2,
    };
    // The model integrates power over the elapsed time: it needs no
    // baseline, so even the first interval after start has its joules.
    let expected = 2.0 * (0.64 + (3.97 - 0.64) * 0.25) * 10.0;
    for interval in ["first", "second"] {
        let joules = model.sample(&ctx).unwrap()[0].joules.0;
        assert!(
            (joules - expected).abs() < 1e-9,
            "{interval} interval: {joules} J vs {expected} J"
        );
    }
}

#[test]
fn unknown_cpus_get_the_generic_row_and_overrides_win() {
    let fixture = SysFixture::new();
    let config = model_only(&fixture, "processor : 0\nvendor_id : SomeVendor\n");
    let meters = detect(&config);
    assert_eq!(meters[0].idle_power(), Some(Watts(0.74)));

    let overridden = MeterConfig {
        model_overrides: Some(ModelCoefficients {
            idle_watts_per_cpu: Watts(2.0),
            max_watts_per_cpu: Watts(5.0),
            origin: "test".into(),
        }),
        ..config
    };
    let mut meters = detect(&overridden);
    let ctx = MeterContext {
        elapsed: Nanos(1_000_000_000),
        cpu_utilisation: Some(1.0),
        cpus: 4,
    };
    meters[0].sample(&ctx).unwrap();
    // The probe's CPU count wins over cpuinfo's.
    assert_eq!(meters[0].sample(&ctx).unwrap()[0].joules, Joules(20.0));
    assert_eq!(meters[0].idle_power(), Some(Watts(8.0)));
}

/// Deterministic noise: a 64-bit LCG mapped to a triangular distribution on
/// (-1, 1), zero mean.
struct Noise(u64);

impl Noise {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn triangular(&mut self) -> f64 {
        self.uniform() + self.uniform() - 1.0
    }
}

#[test]
fn the_online_fit_recovers_coefficients_within_two_percent() {
    let cpus = 16;
    let (idle_per_cpu, max_per_cpu) = (0.9, 4.4);
    let truth = ModelCoefficients {
        idle_watts_per_cpu: Watts(idle_per_cpu),
        max_watts_per_cpu: Watts(max_per_cpu),
        origin: "synthetic".into(),
    };
    let mut noise = Noise(42);
    let mut fit = OnlineFit::new();
    for _ in 0..2_000 {
        let utilisation = noise.uniform();
        // ±4 W of measurement noise on a 14–70 W signal.
        let measured = truth.power(cpus, utilisation).0 + 4.0 * noise.triangular();
        // Fed as an interval's energy, as the exporter will.
        fit.add_interval(utilisation, Joules(measured * 5.0), Nanos(5_000_000_000));
    }
    let result = fit
        .fit(cpus, "synthetic CPU")
        .expect("enough varied samples");
    let idle_error = (result.coefficients.idle_watts_per_cpu.0 - idle_per_cpu).abs() / idle_per_cpu;
    let max_error = (result.coefficients.max_watts_per_cpu.0 - max_per_cpu).abs() / max_per_cpu;
    assert!(
        idle_error < 0.02,
        "idle {:?} vs {idle_per_cpu}",
        result.coefficients.idle_watts_per_cpu
    );
    assert!(
        max_error < 0.02,
        "max {:?} vs {max_per_cpu}",
        result.coefficients.max_watts_per_cpu
    );
    assert_eq!(result.samples, 2_000);
    // The triangular noise's standard deviation is 4/√6 ≈ 1.63 W.
    assert!(
        (result.rmse_watts - 4.0 / 6f64.sqrt()).abs() < 0.2,
        "rmse {}",
        result.rmse_watts
    );
    assert!(
        result.r_squared > 0.95 && result.r_squared <= 1.0,
        "r² {}",
        result.r_squared
    );

    // An exact line is recovered exactly.
    let mut exact = OnlineFit::new();
    for step in 0..=10 {
        let utilisation = f64::from(step) / 10.0;
        exact.add(utilisation, truth.power(cpus, utilisation));
    }
    let exact = exact.fit(cpus, "synthetic CPU").unwrap();
    assert!((exact.coefficients.idle_watts_per_cpu.0 - idle_per_cpu).abs() < 1e-9);
    assert!((exact.coefficients.max_watts_per_cpu.0 - max_per_cpu).abs() < 1e-9);
    assert!(exact.rmse_watts < 1e-9);
}

#[test]
fn fits_round_trip_through_yaml_and_json_files() {
    let dir = tempfile::tempdir().unwrap();
    let fit = ModelFit {
        coefficients: ModelCoefficients {
            idle_watts_per_cpu: Watts(0.8125),
            max_watts_per_cpu: Watts(3.75),
            origin: "online least-squares fit over 3600 samples".into(),
        },
        cpus: 8,
        samples: 3600,
        rmse_watts: 1.5,
        r_squared: 0.97,
        cpu_model: "Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz".into(),
    };
    for name in ["fit.yaml", "fit.yml", "fit.json"] {
        let path = dir.path().join(name);
        fit.save(&path).unwrap();
        let loaded = load_coefficients(&path).unwrap();
        assert_eq!(
            loaded.idle_watts_per_cpu, fit.coefficients.idle_watts_per_cpu,
            "{name}"
        );
        assert_eq!(
            loaded.max_watts_per_cpu, fit.coefficients.max_watts_per_cpu,
            "{name}"
        );
        assert!(
            loaded.origin.contains(name),
            "the origin names the file: {}",
            loaded.origin
        );
    }
    let yaml = std::fs::read_to_string(dir.path().join("fit.yaml")).unwrap();
    assert!(
        yaml.contains("rmse_watts: 1.5") && yaml.contains("cpu_model:"),
        "{yaml}"
    );

    // Hand-written bare coefficients load too.
    let bare = dir.path().join("bare.yaml");
    std::fs::write(&bare, "idle_watts_per_cpu: 1.0\nmax_watts_per_cpu: 4.0\n").unwrap();
    let loaded = load_coefficients(&bare).unwrap();
    assert_eq!(
        (loaded.idle_watts_per_cpu, loaded.max_watts_per_cpu),
        (Watts(1.0), Watts(4.0))
    );
}

#[test]
fn bad_fit_files_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let no_extension = dir.path().join("fit");
    std::fs::write(
        &no_extension,
        "idle_watts_per_cpu: 1\nmax_watts_per_cpu: 2\n",
    )
    .unwrap();
    let err = load_coefficients(&no_extension).unwrap_err();
    assert!(matches!(err, MeterError::Coefficients { .. }));
    assert!(err.to_string().contains(".yaml"), "{err}");

    let inverted = dir.path().join("inverted.json");
    std::fs::write(
        &inverted,
        r#"{"idle_watts_per_cpu": 5, "max_watts_per_cpu": 2}"#,
    )
    .unwrap();
    let err = load_coefficients(&inverted).unwrap_err().to_string();
    assert!(
        err.contains("inverted.json") && err.contains("below"),
        "{err}"
    );

    let garbage = dir.path().join("garbage.yaml");
    std::fs::write(&garbage, "watts: lots\n").unwrap();
    let err = load_coefficients(&garbage).unwrap_err().to_string();
    assert!(
        err.contains("garbage.yaml") && err.contains("idle_watts_per_cpu"),
        "{err}"
    );

    let missing = dir.path().join("missing.yaml");
    assert!(
        load_coefficients(&missing)
            .unwrap_err()
            .to_string()
            .contains("missing.yaml")
    );
}
