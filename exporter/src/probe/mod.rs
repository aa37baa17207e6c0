//! What ran where: per-cgroup CPU usage from eBPF or, where eBPF is refused, /proc.
