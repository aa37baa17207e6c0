//! A node's worth of pods for end-to-end tests: pod-shaped cgroups running
//! busy loops, and the Kubernetes API that describes them.

use std::sync::{Arc, Mutex};

use crate::kube_api::{ApiState, FakeApiServer, pod};
use crate::{BusyChild, CgroupGuard, unique_uid};

/// The node name the fixtures' pods are scheduled on.
pub const NODE: &str = "test-node";

/// A pod of the test: its API object, its cgroup and its busy processes.
pub struct PodFixture {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub container_id: String,
    // Fields drop in order: the processes must be gone before their
    // cgroup can be removed.
    pub children: Vec<BusyChild>,
    pub cgroup: CgroupGuard,
}

impl PodFixture {
    pub fn start(namespace: &str, name: &str, busy: usize) -> PodFixture {
        let uid = unique_uid(name);
        let container_id = format!("{:0>64}", uid.replace('-', ""));
        let cgroup = CgroupGuard::pod(&uid, &container_id);
        // All on CPU 0: one run queue shares it evenly among the busy loops,
        // so pods with 1, 2 and 4 of them really work 1:2:4.
        let children = (0..busy)
            .map(|_| BusyChild::spawn_pinned(&cgroup.path, 0))
            .collect();
        PodFixture {
            uid,
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            container_id,
            cgroup,
            children,
        }
    }

    pub fn api_object(&self) -> serde_json::Value {
        pod(
            &self.uid,
            &self.namespace,
            &self.name,
            NODE,
            &[("main", &format!("containerd://{}", self.container_id))],
        )
    }

    pub fn stop(&mut self) {
        for child in self.children.drain(..) {
            child.stop();
        }
    }
}

/// Arguments for an exporter measuring the fixtures' pods: the fake RAPL
/// tree, the real cgroup v2 root, a fixed idle power (so the active part is
/// known from the first interval; the learned minimum needs a warm-up) and
/// the fake API for names.
pub fn exporter_args(rapl: &crate::FakeRapl, api: &KubeApi) -> Vec<String> {
    vec![
        rapl.host_sys_arg(),
        format!("--cgroup-root={}", crate::cgroup2_root().display()),
        crate::kubelet_cgroup_root_arg(),
        "--meter=rapl".into(),
        "--idle-watts=package=10".into(),
        format!("--kube-api={}", api.url()),
        format!("--node-name={NODE}"),
    ]
}

/// The fake API server lives on its own runtime so the test stays synchronous.
pub struct KubeApi {
    runtime: tokio::runtime::Runtime,
    server: Option<FakeApiServer>,
    pub state: Arc<Mutex<ApiState>>,
    pub address: std::net::SocketAddr,
}

impl KubeApi {
    pub fn start(pods: &[&PodFixture]) -> KubeApi {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(Mutex::new(ApiState::default()));
        for pod in pods {
            state.lock().unwrap().put(pod.api_object());
        }
        let server = runtime.block_on(FakeApiServer::start(state.clone()));
        let address = server.address;
        KubeApi {
            runtime,
            server: Some(server),
            state,
            address,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            self.runtime.block_on(server.stop());
        }
    }

    pub fn restart(&mut self) {
        let server = self
            .runtime
            .block_on(FakeApiServer::start_on(self.address, self.state.clone()));
        self.server = Some(server);
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop();
    }
}
