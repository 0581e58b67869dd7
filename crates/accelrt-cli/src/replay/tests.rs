use super::*;

#[test]
fn capacities() {
    assert_eq!(parse_capacity("1024").unwrap(), 1024);
    assert_eq!(parse_capacity("24GB").unwrap(), 24_000_000_000);
    assert_eq!(parse_capacity("24GiB").unwrap(), 24 << 30);
    assert_eq!(parse_capacity("24 gib").unwrap(), 24 << 30);
    assert_eq!(parse_capacity("512MiB").unwrap(), 512 << 20);
    assert_eq!(parse_capacity("512M").unwrap(), 512 << 20);
    assert_eq!(parse_capacity("1.5GiB").unwrap(), 3 << 29);
    assert_eq!(parse_capacity("0.5KB").unwrap(), 500);
    assert_eq!(parse_capacity("1_000_000").unwrap(), 1_000_000);
    assert!(parse_capacity("16EiB")
        .unwrap_err()
        .to_string()
        .contains("unknown unit 'EiB'"));
    for bad in [
        "",
        "GiB",
        "0",
        "0GiB",
        "-5",
        "1.2.3GB",
        "24XB",
        "99999999999TiB",
        "1.0000000001GB",
        ".",
        "abc",
    ] {
        let e = parse_capacity(bad).unwrap_err().to_string();
        assert!(e.contains(&format!("capacity '{bad}'")), "{bad}: {e}");
        assert!(e.contains("e.g. 24GiB"), "{bad}: {e}");
    }
}

#[test]
fn backends() {
    assert!(backend_provider(DeviceType::Host).unwrap().is_none());
    let cuda = accelrt::backend(DeviceType::Cuda);
    match backend_provider(DeviceType::Cuda) {
        Ok(Some((device, provider))) => {
            assert!(cuda.is_available());
            assert_eq!(device.kind, DeviceType::Cuda);
            assert!(!provider.host_visible());
        }
        Ok(None) => panic!("cuda gave no provider"),
        Err(e) => {
            let reason = cuda.unavailable_reason().unwrap();
            assert_eq!(
                e.to_string(),
                format!("the cuda backend is unavailable: {reason}")
            );
        }
    }
}

#[test]
fn grouping() {
    assert_eq!(group(0), "0");
    assert_eq!(group(999), "999");
    assert_eq!(group(1000), "1,000");
    assert_eq!(group(51_804), "51,804");
    assert_eq!(group(1_234_567), "1,234,567");
}

fn given(choices: Vec<ConfigChoice>) -> Vec<NamedConfig> {
    choices
        .into_iter()
        .map(|c| match c {
            ConfigChoice::Given(n) => *n,
            ConfigChoice::Recorded => panic!("not a given configuration"),
        })
        .collect()
}

#[test]
fn configs() {
    let c = given(parse_configs(&[]).unwrap());
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].label, "default");
    let c = given(parse_configs(&["".into(), " expandable_segments:true ".into()]).unwrap());
    assert_eq!(c[0].label, "default");
    assert_eq!(c[0].config, AllocatorConfig::default());
    assert_eq!(c[1].label, "expandable_segments:true");
    assert!(c[1].config.expandable_segments);
    let e = parse_configs(&["bogus:1".into()])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("--alloc-conf 'bogus:1': unknown option 'bogus'"),
        "{e}"
    );
}
