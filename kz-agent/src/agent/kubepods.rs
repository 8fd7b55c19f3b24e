//! Where the kubelet puts a pod's cgroup, in both of its cgroup drivers' layouts.
//!
//! Below the kubelet's cgroup root (the cgroup v2 mount unless `--cgroup-root` says otherwise),
//! pods are grouped by QoS class; Guaranteed pods sit directly under the top cgroup:
//!
//! | driver     | Guaranteed                        | Burstable / BestEffort                                                       |
//! |------------|-----------------------------------|------------------------------------------------------------------------------|
//! | `systemd`  | `kubepods.slice/kubepods-pod<U>.slice` | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<U>.slice` |
//! | `cgroupfs` | `kubepods/pod<uid>`               | `kubepods/burstable/pod<uid>`, `kubepods/besteffort/pod<uid>`                |
//!
//! `<U>` is the pod UID with `-` written `_` (systemd reads `-` in a unit name as a level of
//! the slice tree). The pod's containers are child cgroups: `cri-containerd-<id>.scope`,
//! `crio-<id>.scope` (and `crio-conmon-<id>.scope`), `docker-<id>.scope` under systemd, the bare
//! container id under cgroupfs; the sandbox ("pause") container is one of them. kz guards the
//! pod's cgroup, so every container, made before or after, is covered (`INHERIT` policy).
//!
//! A pod UID reaches a path here only after [`valid_uid`]: it comes from a token's claims.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KubepodsError {
    #[error("{0:?} is not a pod UID (expected the API server's UUID form, hex digits and dashes)")]
    BadUid(String),
    #[error(
        "pod {uid} has no cgroup on this node under {root} (looked for kubelet's systemd and cgroupfs layouts, every QoS class): it runs elsewhere, has not started, or the kubelet's cgroup root differs (`cgroup_root` in the pods config)"
    )]
    NotOnNode { uid: String, root: PathBuf },
    #[error(
        "pod {uid} has more than one cgroup on this node ({paths:?}); remove the stale one (a kubelet restart with another cgroup driver leaves one behind)"
    )]
    Ambiguous { uid: String, paths: Vec<PathBuf> },
}

/// The kubelet's cgroup driver, as its layout shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// A pod's QoS class, as its cgroup's place shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    const ALL: [Qos; 3] = [Qos::Guaranteed, Qos::Burstable, Qos::BestEffort];

    /// The class's directory name part (`None`: Guaranteed, directly under `kubepods`).
    fn dir(self) -> Option<&'static str> {
        match self {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        }
    }
}

/// A pod's cgroup on this node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PodCgroup {
    pub uid: String,
    pub driver: Driver,
    pub qos: Qos,
    /// Absolute: the kubelet root joined with the layout's path.
    pub path: PathBuf,
}

/// What a cgroup path below the kubelet root says about the pod (and container) it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub uid: String,
    pub driver: Driver,
    pub qos: Qos,
    /// The container's id when the path names a container's cgroup (or a cgroup below one).
    pub container: Option<String>,
}

/// A pod UID as the API server writes it (a UUID: 36 characters of hex digits and dashes).
/// Stricter than Kubernetes needs, on purpose: the value is joined into paths.
pub fn valid_uid(uid: &str) -> bool {
    uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// The pod's cgroup path below the kubelet root in one layout and class.
pub fn relative_path(uid: &str, driver: Driver, qos: Qos) -> PathBuf {
    match driver {
        Driver::Systemd => {
            let unit = uid.replace('-', "_");
            let mut p = PathBuf::from("kubepods.slice");
            match qos.dir() {
                None => p.push(format!("kubepods-pod{unit}.slice")),
                Some(class) => {
                    p.push(format!("kubepods-{class}.slice"));
                    p.push(format!("kubepods-{class}-pod{unit}.slice"));
                }
            }
            p
        }
        Driver::Cgroupfs => {
            let mut p = PathBuf::from("kubepods");
            if let Some(class) = qos.dir() {
                p.push(class);
            }
            p.push(format!("pod{uid}"));
            p
        }
    }
}

/// The cgroup of pod `uid` below `root`, in whichever layout and class it is.
pub fn locate(root: &Path, uid: &str) -> Result<PodCgroup, KubepodsError> {
    if !valid_uid(uid) {
        return Err(KubepodsError::BadUid(uid.chars().take(80).collect()));
    }
    let mut found: Vec<PodCgroup> = Vec::new();
    for driver in [Driver::Systemd, Driver::Cgroupfs] {
        for qos in Qos::ALL {
            let path = root.join(relative_path(uid, driver, qos));
            // A cgroup directory has cgroup.procs; a plain directory of that name is not one.
            if path.join("cgroup.procs").is_file() {
                found.push(PodCgroup {
                    uid: uid.to_owned(),
                    driver,
                    qos,
                    path,
                });
            }
        }
    }
    match found.len() {
        0 => Err(KubepodsError::NotOnNode {
            uid: uid.to_owned(),
            root: root.to_owned(),
        }),
        1 => Ok(found.remove(0)),
        _ => Err(KubepodsError::Ambiguous {
            uid: uid.to_owned(),
            paths: found.into_iter().map(|p| p.path).collect(),
        }),
    }
}

/// Reads a cgroup path relative to the kubelet root: the pod (and container) it belongs to,
/// `None` for anything that is not at or below a pod's cgroup.
pub fn parse(rel: &Path) -> Option<Parsed> {
    // Plain names only: `..` or a root would make the path mean another place.
    let parts: Vec<&str> = rel
        .components()
        .map(|c| match c {
            std::path::Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let (top, rest) = parts.split_first()?;
    let (driver, qos, pod, below) = match *top {
        "kubepods.slice" => {
            let (first, after) = rest.split_first()?;
            match first.strip_prefix("kubepods-") {
                Some(class @ ("burstable.slice" | "besteffort.slice")) => {
                    let qos = if class == "burstable.slice" {
                        Qos::Burstable
                    } else {
                        Qos::BestEffort
                    };
                    let (pod, below) = after.split_first()?;
                    let class = class.trim_end_matches(".slice");
                    let unit = pod
                        .strip_prefix(&format!("kubepods-{class}-pod"))?
                        .strip_suffix(".slice")?;
                    (Driver::Systemd, qos, unit.replace('_', "-"), below)
                }
                _ => {
                    let unit = first.strip_prefix("kubepods-pod")?.strip_suffix(".slice")?;
                    (
                        Driver::Systemd,
                        Qos::Guaranteed,
                        unit.replace('_', "-"),
                        after,
                    )
                }
            }
        }
        "kubepods" => {
            let (first, after) = rest.split_first()?;
            let (qos, pod, below) = match *first {
                "burstable" | "besteffort" => {
                    let (pod, below) = after.split_first()?;
                    let qos = if *first == "burstable" {
                        Qos::Burstable
                    } else {
                        Qos::BestEffort
                    };
                    (qos, *pod, below)
                }
                pod => (Qos::Guaranteed, pod, after),
            };
            (
                Driver::Cgroupfs,
                qos,
                pod.strip_prefix("pod")?.to_owned(),
                below,
            )
        }
        _ => return None,
    };
    if !valid_uid(&pod) {
        return None;
    }
    let container = below.first().map(|c| container_id(driver, c));
    Some(Parsed {
        uid: pod,
        driver,
        qos,
        container,
    })
}

/// A container cgroup's name without the runtime's decoration.
fn container_id(driver: Driver, name: &str) -> String {
    if driver == Driver::Cgroupfs {
        return name.to_owned();
    }
    let bare = name.strip_suffix(".scope").unwrap_or(name);
    for prefix in ["cri-containerd-", "crio-conmon-", "crio-", "docker-"] {
        if let Some(id) = bare.strip_prefix(prefix) {
            return id.to_owned();
        }
    }
    bare.to_owned()
}

/// Every pod cgroup below `root`, in both layouts.
pub fn discover(root: &Path) -> Vec<PodCgroup> {
    let mut out = Vec::new();
    for top in ["kubepods.slice", "kubepods"] {
        let base = root.join(top);
        let mut dirs = vec![base.clone()];
        for class in [
            "kubepods-burstable.slice",
            "kubepods-besteffort.slice",
            "burstable",
            "besteffort",
        ] {
            dirs.push(base.join(class));
        }
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                let Ok(rel) = path.strip_prefix(root) else {
                    continue;
                };
                if let Some(p) = parse(rel).filter(|p| p.container.is_none())
                    && path.join("cgroup.procs").is_file()
                {
                    out.push(PodCgroup {
                        uid: p.uid,
                        driver: p.driver,
                        qos: p.qos,
                        path,
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5f0c2a7e-1b3d-4c5e-9f80-a1b2c3d4e5f6";

    #[test]
    fn pod_uids_are_uuids_only() {
        assert!(valid_uid(UID));
        for bad in [
            "",
            "../../../etc",
            "5f0c2a7e_1b3d_4c5e_9f80_a1b2c3d4e5f6",
            "5f0c2a7e-1b3d-4c5e-9f80-a1b2c3d4e5f", // short
            "5f0c2a7e-1b3d-4c5e-9f80/a1b2c3d4e5f6",
            "zf0c2a7e-1b3d-4c5e-9f80-a1b2c3d4e5f6",
        ] {
            assert!(!valid_uid(bad), "{bad:?}");
        }
    }

    #[test]
    fn both_layouts_and_every_qos_class_round_trip() {
        let expected = [
            (
                Driver::Systemd,
                Qos::Guaranteed,
                "kubepods.slice/kubepods-pod5f0c2a7e_1b3d_4c5e_9f80_a1b2c3d4e5f6.slice",
            ),
            (
                Driver::Systemd,
                Qos::Burstable,
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f0c2a7e_1b3d_4c5e_9f80_a1b2c3d4e5f6.slice",
            ),
            (
                Driver::Systemd,
                Qos::BestEffort,
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5f0c2a7e_1b3d_4c5e_9f80_a1b2c3d4e5f6.slice",
            ),
            (
                Driver::Cgroupfs,
                Qos::Guaranteed,
                "kubepods/pod5f0c2a7e-1b3d-4c5e-9f80-a1b2c3d4e5f6",
            ),
            (
                Driver::Cgroupfs,
                Qos::Burstable,
                "kubepods/burstable/pod5f0c2a7e-1b3d-4c5e-9f80-a1b2c3d4e5f6",
            ),
            (
                Driver::Cgroupfs,
                Qos::BestEffort,
                "kubepods/besteffort/pod5f0c2a7e-1b3d-4c5e-9f80-a1b2c3d4e5f6",
            ),
        ];
        for (driver, qos, path) in expected {
            assert_eq!(relative_path(UID, driver, qos), PathBuf::from(path));
            let p = parse(Path::new(path)).unwrap_or_else(|| panic!("{path}"));
            assert_eq!(
                (p.uid.as_str(), p.driver, p.qos),
                (UID, driver, qos),
                "{path}"
            );
            assert_eq!(p.container, None);
        }
    }

    #[test]
    fn container_cgroups_name_their_pod_and_container() {
        let id = "0b9c6a3f2e1d";
        for (path, driver, qos) in [
            (
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope",
                    UID.replace('-', "_")
                ),
                Driver::Systemd,
                Qos::Burstable,
            ),
            (
                format!(
                    "kubepods.slice/kubepods-pod{}.slice/crio-{id}.scope",
                    UID.replace('-', "_")
                ),
                Driver::Systemd,
                Qos::Guaranteed,
            ),
            (
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/docker-{id}.scope",
                    UID.replace('-', "_")
                ),
                Driver::Systemd,
                Qos::BestEffort,
            ),
            (
                format!("kubepods/besteffort/pod{UID}/{id}"),
                Driver::Cgroupfs,
                Qos::BestEffort,
            ),
            (
                format!("kubepods/pod{UID}/{id}"),
                Driver::Cgroupfs,
                Qos::Guaranteed,
            ),
        ] {
            let p = parse(Path::new(&path)).unwrap_or_else(|| panic!("{path}"));
            assert_eq!(
                p,
                Parsed {
                    uid: UID.into(),
                    driver,
                    qos,
                    container: Some(id.into())
                },
                "{path}"
            );
        }
    }

    #[test]
    fn other_cgroups_are_no_pods() {
        for path in [
            "kubepods.slice",
            "kubepods.slice/kubepods-burstable.slice",
            "kubepods/burstable",
            "kubepods",
            "system.slice/containerd.service",
            "kz/123-456-0/run-1",
            "kubepods/podnot-a-uid",
            "kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod5f0c2a7e_1b3d_4c5e_9f80_a1b2c3d4e5f6.slice",
            "../kubepods/pod5f0c2a7e-1b3d-4c5e-9f80-a1b2c3d4e5f6",
        ] {
            assert_eq!(parse(Path::new(path)), None, "{path}");
        }
    }

    #[test]
    fn locate_finds_the_one_layout_present() {
        let root = std::env::temp_dir().join(format!("kz-kubepods-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let err = locate(&root, UID).unwrap_err();
        assert!(matches!(err, KubepodsError::NotOnNode { .. }), "{err}");
        assert!(matches!(
            locate(&root, "../x"),
            Err(KubepodsError::BadUid(_))
        ));
        // A plain directory stands in for a cgroup once it has a cgroup.procs file.
        let rel = relative_path(UID, Driver::Systemd, Qos::BestEffort);
        std::fs::create_dir_all(root.join(&rel)).unwrap();
        assert!(
            locate(&root, UID).is_err(),
            "a directory without cgroup.procs is no cgroup"
        );
        std::fs::write(root.join(&rel).join("cgroup.procs"), "").unwrap();
        let found = locate(&root, UID).unwrap();
        assert_eq!(
            (found.driver, found.qos),
            (Driver::Systemd, Qos::BestEffort)
        );
        assert_eq!(found.path, root.join(&rel));
        assert_eq!(discover(&root), vec![found]);
        let other = relative_path(UID, Driver::Cgroupfs, Qos::Guaranteed);
        std::fs::create_dir_all(root.join(&other)).unwrap();
        std::fs::write(root.join(&other).join("cgroup.procs"), "").unwrap();
        assert!(matches!(
            locate(&root, UID),
            Err(KubepodsError::Ambiguous { .. })
        ));
        assert_eq!(discover(&root).len(), 2);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
