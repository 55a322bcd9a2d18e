//! The native sections of the state document (docs/snapshot-format.md) as JSON: `vcpus`,
//! `machine`, `devices` and `virtio_devices`, KVM structures and byte registers in base64.
//! Python adds and checks the versioned fields around them (vmmpy/snapshot.py). Encoding and
//! parsing here keeps them out of a migration's downtime: ~20 µs where building, base64-ing and
//! dumping Python dicts took ~0.4 ms on both sides.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::de::{Error as _, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use virtio_queue::QueueState;
use vm_superio::serial::SerialState;

use crate::devices::virtio::msix::MsixState;
use crate::devices::virtio::pci::{TransportState, VirtioPciState};
use crate::error::{Error, Kind, Result};
use crate::state::{Blobs, VcpuState};
use crate::vm::SavedState;

/// Bytes as a base64 string.
struct B64(Vec<u8>);

impl Serialize for B64 {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for B64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        // Decoded from the text in place: no String is made of it first.
        struct Text;
        impl Visitor<'_> for Text {
            type Value = B64;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a base64 string")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> std::result::Result<B64, E> {
                STANDARD
                    .decode(text)
                    .map(B64)
                    .map_err(|e| E::custom(format!("not base64: {e}")))
            }
        }
        d.deserialize_str(Text)
    }
}

fn blob_map(blobs: &Blobs) -> BTreeMap<String, B64> {
    blobs
        .iter()
        .map(|(name, b)| (name.clone(), B64(b.clone())))
        .collect()
}

fn blobs(map: BTreeMap<String, B64>) -> Blobs {
    map.into_iter().map(|(name, b)| (name, b.0)).collect()
}

#[derive(Serialize)]
struct VcpuDoc {
    msrs: Vec<(u32, u64)>,
    /// One entry per KVM structure (regs, sregs, xsave, ...).
    #[serde(flatten)]
    structs: BTreeMap<String, B64>,
}

impl<'de> Deserialize<'de> for VcpuDoc {
    /// By hand: serde's flatten would buffer the whole object first (several times slower,
    /// inside a migration's downtime).
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = VcpuDoc;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a vCPU's msrs and KVM structures")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<VcpuDoc, A::Error> {
                let mut msrs = None;
                let mut structs = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    let fresh = if key == "msrs" {
                        msrs.replace(map.next_value()?).is_none()
                    } else {
                        let value = map.next_value()?;
                        structs.insert(key.clone(), value).is_none()
                    };
                    if !fresh {
                        return Err(A::Error::custom(format!("duplicate field `{key}`")));
                    }
                }
                let msrs = msrs.ok_or_else(|| A::Error::missing_field("msrs"))?;
                Ok(VcpuDoc { msrs, structs })
            }
        }
        d.deserialize_map(Fields)
    }
}

#[derive(Serialize, Deserialize)]
struct SerialDoc {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: B64,
}

#[derive(Serialize, Deserialize)]
struct CmosDoc {
    nvram: B64,
    index: u8,
}

#[derive(Serialize, Deserialize)]
struct DevicesDoc {
    serial: SerialDoc,
    cmos: CmosDoc,
}

/// One queue: virtio-queue's QueueState as the document spells it, and its MSI-X vector. (Its
/// fields spelled out, not flattened: serde's flatten buffers each object before parsing it.)
#[derive(Serialize, Deserialize)]
struct QueueDoc {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
    event_idx: bool,
    msix_vector: u16,
}

fn queue_doc(q: &QueueState, msix_vector: u16) -> QueueDoc {
    QueueDoc {
        max_size: q.max_size,
        size: q.size,
        ready: q.ready,
        desc_table: q.desc_table,
        avail_ring: q.avail_ring,
        used_ring: q.used_ring,
        next_avail: q.next_avail,
        next_used: q.next_used,
        event_idx: q.event_idx_enabled,
        msix_vector,
    }
}

fn queue_state(d: &QueueDoc) -> QueueState {
    QueueState {
        max_size: d.max_size,
        size: d.size,
        ready: d.ready,
        desc_table: d.desc_table,
        avail_ring: d.avail_ring,
        used_ring: d.used_ring,
        next_avail: d.next_avail,
        next_used: d.next_used,
        event_idx_enabled: d.event_idx,
    }
}

#[derive(Serialize, Deserialize)]
struct MsixDoc {
    table: Vec<[u32; 4]>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
}

#[derive(Serialize, Deserialize)]
struct VirtioDoc {
    id: String,
    config_space: B64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    config_vector: u16,
    isr: u8,
    queues: Vec<QueueDoc>,
    msix: MsixDoc,
}

#[derive(Serialize)]
struct NativeSections {
    vcpus: Vec<VcpuDoc>,
    machine: BTreeMap<String, B64>,
    devices: DevicesDoc,
    /// Absent before format 1.3, and written only for a VM with virtio devices.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    virtio_devices: Vec<VirtioDoc>,
}

fn serial_doc(s: &SerialState) -> SerialDoc {
    SerialDoc {
        baud_divisor_low: s.baud_divisor_low,
        baud_divisor_high: s.baud_divisor_high,
        interrupt_enable: s.interrupt_enable,
        interrupt_identification: s.interrupt_identification,
        line_control: s.line_control,
        line_status: s.line_status,
        modem_control: s.modem_control,
        modem_status: s.modem_status,
        scratch: s.scratch,
        in_buffer: B64(s.in_buffer.clone()),
    }
}

fn serial_state(d: SerialDoc) -> SerialState {
    SerialState {
        baud_divisor_low: d.baud_divisor_low,
        baud_divisor_high: d.baud_divisor_high,
        interrupt_enable: d.interrupt_enable,
        interrupt_identification: d.interrupt_identification,
        line_control: d.line_control,
        line_status: d.line_status,
        modem_control: d.modem_control,
        modem_status: d.modem_status,
        scratch: d.scratch,
        in_buffer: d.in_buffer.0,
    }
}

fn virtio_doc(id: &str, st: &VirtioPciState) -> VirtioDoc {
    let t = &st.transport;
    let queues = st.queues.iter().zip(&st.queue_vectors);
    VirtioDoc {
        id: id.to_string(),
        config_space: B64(st.config_space.clone()),
        device_feature_select: t.device_feature_select,
        driver_feature_select: t.driver_feature_select,
        driver_features: t.driver_features,
        status: t.status,
        config_generation: t.config_generation,
        queue_select: t.queue_select,
        config_vector: t.config_vector,
        isr: t.isr,
        queues: queues.map(|(q, &vector)| queue_doc(q, vector)).collect(),
        msix: MsixDoc {
            table: st.msix.table.clone(),
            pba: st.msix.pba.clone(),
            enabled: st.msix.enabled,
            function_masked: st.msix.function_masked,
        },
    }
}

fn virtio_state(d: VirtioDoc) -> (String, VirtioPciState) {
    let (queues, queue_vectors) = d
        .queues
        .into_iter()
        .map(|q| (queue_state(&q), q.msix_vector))
        .unzip();
    let transport = TransportState {
        device_feature_select: d.device_feature_select,
        driver_feature_select: d.driver_feature_select,
        driver_features: d.driver_features,
        status: d.status,
        config_generation: d.config_generation,
        queue_select: d.queue_select,
        config_vector: d.config_vector,
        isr: d.isr,
    };
    let msix = MsixState {
        table: d.msix.table,
        pba: d.msix.pba,
        enabled: d.msix.enabled,
        function_masked: d.msix.function_masked,
    };
    let st = VirtioPciState {
        config_space: d.config_space.0,
        transport,
        queues,
        queue_vectors,
        msix,
    };
    (d.id, st)
}

/// The native sections of `st` as one JSON object.
pub fn encode(st: &SavedState) -> Vec<u8> {
    let doc = NativeSections {
        vcpus: st
            .vcpus
            .iter()
            .map(|v| VcpuDoc {
                msrs: v.msrs.clone(),
                structs: blob_map(&v.blobs),
            })
            .collect(),
        machine: blob_map(&st.machine),
        devices: DevicesDoc {
            serial: serial_doc(&st.serial),
            cmos: CmosDoc {
                nvram: B64(st.cmos.0.clone()),
                index: st.cmos.1,
            },
        },
        virtio_devices: st.devices.iter().map(|(id, d)| virtio_doc(id, d)).collect(),
    };
    serde_json::to_vec(&doc).expect("the state document's types all serialize")
}

fn malformed(what: impl std::fmt::Display) -> Error {
    Error::new(
        Kind::InvalidConfig,
        format!("malformed state document: {what}"),
    )
}

/// The document's native sections, parsed in one pass, and its other fields as they are.
struct Document<'a> {
    vcpus: Option<Vec<VcpuDoc>>,
    machine: Option<BTreeMap<String, B64>>,
    devices: Option<DevicesDoc>,
    virtio: Option<Vec<VirtioDoc>>,
    rest: BTreeMap<String, &'a RawValue>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Document<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Fields<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Fields<'a> {
            type Value = Document<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a state document (a JSON object)")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Document<'a>, A::Error> {
                fn set<T, E: serde::de::Error>(
                    slot: &mut Option<T>,
                    name: &str,
                    value: std::result::Result<T, E>,
                ) -> std::result::Result<bool, E> {
                    let value = value.map_err(|e| E::custom(format!("{name}: {e}")))?;
                    Ok(slot.replace(value).is_none())
                }
                let mut doc = Document {
                    vcpus: None,
                    machine: None,
                    devices: None,
                    virtio: None,
                    rest: BTreeMap::new(),
                };
                while let Some(key) = map.next_key::<String>()? {
                    let fresh = match key.as_str() {
                        "vcpus" => set(&mut doc.vcpus, &key, map.next_value())?,
                        "machine" => set(&mut doc.machine, &key, map.next_value())?,
                        "devices" => set(&mut doc.devices, &key, map.next_value())?,
                        "virtio_devices" => set(&mut doc.virtio, &key, map.next_value())?,
                        _ => {
                            let value = map.next_value()?;
                            doc.rest.insert(key.clone(), value).is_none()
                        }
                    };
                    if !fresh {
                        return Err(A::Error::custom(format!("duplicate field `{key}`")));
                    }
                }
                Ok(doc)
            }
        }
        d.deserialize_map(Fields(std::marker::PhantomData))
    }
}

fn required<T>(section: Option<T>, name: &str) -> Result<T> {
    section.ok_or_else(|| malformed(format!("no {name:?}")))
}

/// The state in `document` (a whole state document), and a JSON object of its other fields (the
/// versioned ones Python checks).
pub fn decode(document: &[u8]) -> Result<(SavedState, Vec<u8>)> {
    let doc: Document = serde_json::from_slice(document).map_err(malformed)?;
    let vcpus = required(doc.vcpus, "vcpus")?;
    let machine = required(doc.machine, "machine")?;
    let devices = required(doc.devices, "devices")?;
    let virtio = doc.virtio.unwrap_or_default();
    let st = SavedState {
        vcpus: vcpus
            .into_iter()
            .map(|v| VcpuState {
                blobs: blobs(v.structs),
                msrs: v.msrs,
            })
            .collect(),
        machine: blobs(machine),
        serial: serial_state(devices.serial),
        cmos: (devices.cmos.nvram.0, devices.cmos.index),
        devices: virtio.into_iter().map(virtio_state).collect(),
    };
    let rest = serde_json::to_vec(&doc.rest).expect("raw JSON values serialize");
    Ok((st, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(with_virtio: bool) -> SavedState {
        let queue = QueueState {
            max_size: 256,
            size: 128,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            next_avail: 7,
            next_used: 6,
            event_idx_enabled: true,
        };
        let virtio = VirtioPciState {
            config_space: vec![0xab; 256],
            transport: TransportState {
                device_feature_select: 1,
                driver_feature_select: 0,
                driver_features: 1 << 32 | 1 << 29,
                status: 15,
                config_generation: 2,
                queue_select: 0,
                config_vector: 0xffff,
                isr: 1,
            },
            queues: vec![queue],
            queue_vectors: vec![1],
            msix: MsixState {
                table: vec![[0xfee0_0000, 0, 0x41, 0], [0, 0, 0, 1]],
                pba: vec![0],
                enabled: true,
                function_masked: false,
            },
        };
        SavedState {
            vcpus: vec![VcpuState {
                blobs: vec![
                    ("regs".into(), vec![1, 2, 3]),
                    ("xsave".into(), vec![9; 4096]),
                ],
                msrs: vec![(0x10, u64::MAX), (0xc000_0080, 0xd01)],
            }],
            machine: vec![("clock".into(), vec![0; 48])],
            serial: SerialState {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 1,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: b"ab".to_vec(),
            },
            cmos: (vec![5; 128], 0x0b),
            devices: if with_virtio {
                vec![("disk0".into(), virtio)]
            } else {
                Vec::new()
            },
        }
    }

    fn document(native: &[u8], head: &str) -> Vec<u8> {
        [head.as_bytes(), &native[1..]].concat()
    }

    fn same(a: &SavedState, b: &SavedState) -> bool {
        let blobs_eq = |x: &Blobs, y: &Blobs| {
            let (mut x, mut y) = (x.clone(), y.clone());
            x.sort();
            y.sort();
            x == y
        };
        a.vcpus.len() == b.vcpus.len()
            && a.vcpus
                .iter()
                .zip(&b.vcpus)
                .all(|(x, y)| blobs_eq(&x.blobs, &y.blobs) && x.msrs == y.msrs)
            && blobs_eq(&a.machine, &b.machine)
            && a.serial == b.serial
            && a.cmos == b.cmos
            && a.devices == b.devices
    }

    #[test]
    fn a_state_comes_back_as_it_was_saved_with_the_other_fields_apart() {
        for with_virtio in [false, true] {
            let st = sample(with_virtio);
            let native = encode(&st);
            let text = std::str::from_utf8(&native).unwrap();
            assert_eq!(text.contains("virtio_devices"), with_virtio);
            let doc = document(&native, r#"{"format_version":"1.4","payload":{"size":3},"#);
            let (back, rest) = decode(&doc).unwrap();
            assert!(same(&st, &back));
            let rest: serde_json::Value = serde_json::from_slice(&rest).unwrap();
            assert_eq!(
                rest,
                serde_json::json!({"format_version": "1.4", "payload": {"size": 3}})
            );
        }
    }

    #[test]
    fn the_wire_shape_is_the_documented_one() {
        let v: serde_json::Value = serde_json::from_slice(&encode(&sample(true))).unwrap();
        assert_eq!(v["vcpus"][0]["regs"], "AQID");
        assert_eq!(v["vcpus"][0]["msrs"][0], serde_json::json!([16, u64::MAX]));
        assert_eq!(v["devices"]["serial"]["in_buffer"], "YWI=");
        assert_eq!(v["devices"]["cmos"]["index"], 11);
        assert_eq!(v["virtio_devices"][0]["queues"][0]["event_idx"], true);
        assert_eq!(v["virtio_devices"][0]["msix"]["table"][0][2], 0x41);
    }

    #[test]
    fn a_malformed_document_is_refused_with_what_is_wrong() {
        let native = encode(&sample(false));
        let message = |doc: &[u8]| decode(doc).err().unwrap().message;
        assert!(message(b"[1]").starts_with("malformed state document"));
        let no_base64 = String::from_utf8(native.clone())
            .unwrap()
            .replace("AQID", "A!ID");
        assert!(message(no_base64.as_bytes()).contains("vcpus: not base64"));
        let text = String::from_utf8(native).unwrap();
        let no_machine = text.replace("\"machine\"", "\"machinery\"");
        assert!(message(no_machine.as_bytes()).contains("no \"machine\""));
        let bad_index = text.replace("\"index\":11", "\"index\":300");
        assert!(message(bad_index.as_bytes()).contains("devices:"));
    }
}
