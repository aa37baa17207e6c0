//! What the probe needs from the kernel's BTF, found without parsing it whole.
//!
//! aya 0.14 turns `/sys/kernel/btf/vmlinux` (5.5 MB, ~127,000 types on the
//! test machines) into ~15 MB of Rust values whenever it uses BTF: that parse
//! was the exporter's start-up memory peak. The probe needs a few facts from
//! it: the id of the typedef `btf_trace_sched_switch` (what a `tp_btf`
//! program is attached by) and the offsets of the fields the programs read
//! (`task_struct.pid`; the path to the task's cgroup id:
//! `task_struct.cgroups`, `css_set.dfl_cgrp`, `cgroup.kn`, `kernfs_node.id`,
//! which is what `bpf_get_current_cgroup_id` follows; and the path to its
//! run queue's clock: `task_struct.se`, `sched_entity.cfs_rq`, `cfs_rq.rq`,
//! `rq.clock`, the time without a `bpf_ktime_get_ns` call). [`scan`] reads the file once, front to
//! back, through a small buffer; [`attach_btf`] hands aya a BTF that holds
//! that typedef at its kernel id and nothing else, which aya parses in a
//! fraction of the memory.
//!
//! Format: `Documentation/bpf/btf.rst` of the kernel. A header, then the
//! type section (each type a 12-byte `btf_type` and a kind-dependent tail),
//! then the string section; type ids count from 1 in file order.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const KIND_PTR: u32 = 2;
const KIND_STRUCT: u32 = 4;
const KIND_TYPEDEF: u32 = 8;

/// The struct fields whose byte offsets the programs need.
const FIELDS: [(&str, &str); 9] = [
    ("task_struct", "pid"),
    ("task_struct", "cgroups"),
    ("css_set", "dfl_cgrp"),
    ("cgroup", "kn"),
    ("kernfs_node", "id"),
    ("task_struct", "se"),
    ("sched_entity", "cfs_rq"),
    ("cfs_rq", "rq"),
    ("rq", "clock"),
];

/// The facts of one kernel's BTF the probe uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFacts {
    /// Type id of `btf_trace_sched_switch`.
    pub sched_switch_typedef_id: u32,
    /// Byte offset of `pid` in `struct task_struct`, where found.
    pub task_pid_offset: Option<u32>,
    /// Byte offsets of `task_struct.cgroups`, `css_set.dfl_cgrp`,
    /// `cgroup.kn` and `kernfs_node.id`, where all are found.
    pub cgroup_id_path: Option<[u32; 4]>,
    /// Byte offsets of `task_struct.se.cfs_rq` (`se` plus `cfs_rq`),
    /// `cfs_rq.rq` and `rq.clock`, where all are found (`sched_entity`
    /// has `cfs_rq` only with `CONFIG_FAIR_GROUP_SCHED`).
    pub rq_clock_path: Option<[u32; 3]>,
}

fn invalid(detail: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, detail.into())
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// Bytes that follow a type's 12-byte head, by kind and member count.
fn tail_len(kind: u32, vlen: u32) -> Option<u64> {
    let vlen = u64::from(vlen);
    Some(match kind {
        // INT, VAR, DECL_TAG: one u32.
        1 | 14 | 17 => 4,
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG.
        2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
        // ARRAY: one btf_array.
        3 => 12,
        // STRUCT, UNION, DATASEC, ENUM64: 12 bytes per member.
        4 | 5 | 15 | 19 => 12 * vlen,
        // ENUM, FUNC_PROTO: 8 bytes per member.
        6 | 13 => 8 * vlen,
        _ => return None,
    })
}

/// String offsets of `names` in the string section (`None` where absent).
fn string_offsets<R: BufRead>(strings: R, names: &[&str]) -> io::Result<Vec<Option<u32>>> {
    let mut found = vec![None; names.len()];
    let mut offset = 0u32;
    let mut text = Vec::with_capacity(128);
    let mut strings = strings;
    loop {
        text.clear();
        let read = strings.read_until(0, &mut text)?;
        if read == 0 {
            return Ok(found);
        }
        let name = text.strip_suffix(&[0]).unwrap_or(&text);
        for (slot, wanted) in found.iter_mut().zip(names) {
            if slot.is_none() && name == wanted.as_bytes() {
                *slot = Some(offset);
            }
        }
        offset += read as u32;
    }
}

/// Reads the facts from a little-endian BTF file (the kernel's own byte
/// order on every architecture Ergon is built for).
pub fn scan(path: &Path) -> io::Result<KernelFacts> {
    let mut file = BufReader::with_capacity(64 * 1024, File::open(path)?);
    let mut header = [0u8; HEADER_LEN];
    file.read_exact(&mut header)?;
    if u16::from_le_bytes([header[0], header[1]]) != MAGIC {
        return Err(invalid("not little-endian BTF (bad magic)"));
    }
    let hdr_len = u64::from(u32_at(&header, 4));
    let (type_off, type_len) = (
        u64::from(u32_at(&header, 8)),
        u64::from(u32_at(&header, 12)),
    );
    let (str_off, str_len) = (
        u64::from(u32_at(&header, 16)),
        u64::from(u32_at(&header, 20)),
    );

    file.seek(SeekFrom::Start(hdr_len + str_off))?;
    let mut names = vec!["btf_trace_sched_switch"];
    for (structure, member) in FIELDS {
        names.extend([structure, member]);
    }
    let offsets = string_offsets((&mut file).take(str_len), &names)?;
    let typedef_name =
        offsets[0].ok_or_else(|| invalid("no btf_trace_sched_switch among the strings"))?;
    // Per field: its struct's and its member's name offsets.
    let wanted: Vec<(Option<u32>, Option<u32>)> = offsets[1..]
        .chunks(2)
        .map(|pair| (pair[0], pair[1]))
        .collect();

    file.seek(SeekFrom::Start(hdr_len + type_off))?;
    let mut types = (&mut file).take(type_len);
    let mut typedef_id = None;
    let mut field_offsets: Vec<Option<u32>> = vec![None; FIELDS.len()];
    let mut head = [0u8; 12];
    let mut id = 0u32;
    while typedef_id.is_none() || field_offsets.iter().any(Option::is_none) {
        match types.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        id += 1;
        let (name, info) = (u32_at(&head, 0), u32_at(&head, 4));
        let (kind, vlen, kind_flag) = ((info >> 24) & 0x1f, info & 0xffff, info >> 31 == 1);
        let tail =
            tail_len(kind, vlen).ok_or_else(|| invalid(format!("type {id}: kind {kind}")))?;
        if kind == KIND_TYPEDEF && name == typedef_name {
            typedef_id = Some(id);
        }
        let is_wanted =
            |field: usize| field_offsets[field].is_none() && wanted[field].0 == Some(name);
        if kind == KIND_STRUCT && (0..FIELDS.len()).any(is_wanted) {
            let fields: Vec<usize> = (0..FIELDS.len()).filter(|&f| is_wanted(f)).collect();
            let mut member = [0u8; 12];
            for _ in 0..vlen {
                types.read_exact(&mut member)?;
                let bits = u32_at(&member, 8);
                // With kind_flag set, the top byte is a bitfield's size.
                let bit_offset = if kind_flag { bits & 0x00ff_ffff } else { bits };
                for &field in &fields {
                    if Some(u32_at(&member, 0)) == wanted[field].1 && bit_offset % 8 == 0 {
                        field_offsets[field] = Some(bit_offset / 8);
                    }
                }
            }
            continue;
        }
        io::copy(&mut (&mut types).take(tail), &mut io::sink())?;
    }
    let path = [1, 2, 3, 4].map(|field| field_offsets[field]);
    let clock = [5, 6, 7, 8].map(|field| field_offsets[field]);
    Ok(KernelFacts {
        sched_switch_typedef_id: typedef_id
            .ok_or_else(|| invalid("no typedef btf_trace_sched_switch"))?,
        task_pid_offset: field_offsets[0],
        cgroup_id_path: match path {
            [Some(a), Some(b), Some(c), Some(d)] => Some([a, b, c, d]),
            _ => None,
        },
        rq_clock_path: match clock {
            [Some(se), Some(cfs_rq), Some(rq), Some(clock)] => Some([se + cfs_rq, rq, clock]),
            _ => None,
        },
    })
}

/// A BTF holding only the typedef `btf_trace_<tracepoint>` at type id
/// `typedef_id` (the kernel's id of it): all that
/// `aya::programs::BtfTracePoint::load` looks up. The ids before it are
/// filled with anonymous pointers, 12 bytes each.
pub fn attach_btf(tracepoint: &str, typedef_id: u32) -> Result<aya::Btf, aya::BtfError> {
    let strings = format!("\0btf_trace_{tracepoint}\0");
    let type_len = typedef_id * 12;
    let mut blob = Vec::with_capacity(HEADER_LEN + type_len as usize + strings.len());
    blob.extend_from_slice(&MAGIC.to_le_bytes());
    blob.extend_from_slice(&[1, 0]); // version, flags
    for field in [
        HEADER_LEN as u32,
        0,
        type_len,
        type_len,
        strings.len() as u32,
    ] {
        blob.extend_from_slice(&field.to_le_bytes());
    }
    for _ in 1..typedef_id {
        for field in [0, KIND_PTR << 24, 0u32] {
            blob.extend_from_slice(&field.to_le_bytes());
        }
    }
    for field in [1, KIND_TYPEDEF << 24, 0u32] {
        blob.extend_from_slice(&field.to_le_bytes());
    }
    blob.extend_from_slice(strings.as_bytes());
    aya::Btf::parse(&blob, aya::Endianness::Little)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

    /// The scan agrees with aya's full parse on this kernel.
    #[test]
    fn scan_finds_what_a_full_parse_finds() {
        if !Path::new(VMLINUX).exists() {
            eprintln!("no kernel BTF here: nothing to compare");
            return;
        }
        let facts = scan(Path::new(VMLINUX)).unwrap();
        let full = aya::Btf::from_sys_fs().unwrap();
        let expected = full
            .id_by_type_name_kind("btf_trace_sched_switch", aya_obj::btf::BtfKind::Typedef)
            .unwrap();
        assert_eq!(facts.sched_switch_typedef_id, expected);
        assert!(facts.task_pid_offset.is_some(), "{facts:?}");
        assert!(facts.cgroup_id_path.is_some(), "{facts:?}");
        assert!(facts.rq_clock_path.is_some(), "{facts:?}");
    }

    #[test]
    fn the_small_btf_names_the_typedef_at_the_kernels_id() {
        let btf = attach_btf("sched_switch", 10306).unwrap();
        assert_eq!(
            btf.id_by_type_name_kind("btf_trace_sched_switch", aya_obj::btf::BtfKind::Typedef)
                .unwrap(),
            10306
        );
    }
}
