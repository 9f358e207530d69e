//! The generated code speaks csi.v1 on the wire: proto/csi.proto declares
//! the spec's services and RPCs, field and enum numbers are checked through
//! encoded bytes (those added with the v1.13.0-rc1 definitions included),
//! and the gRPC paths kubelet and the sidecars call.

use std::collections::HashMap;

use csi::capabilities::block;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::*;
use prost::Message;

/// The tag byte of field `n` with wire type 2 (length-delimited).
fn ld(n: u8) -> u8 {
    (n << 3) | 2
}

/// Whether `bytes` has a top-level field `n`, walking the encoding.
fn fields(bytes: &[u8]) -> Vec<(u64, u8)> {
    let mut out = Vec::new();
    let mut b = bytes;
    let varint = |b: &mut &[u8]| -> u64 {
        let mut v = 0u64;
        let mut s = 0;
        loop {
            let x = b[0];
            *b = &b[1..];
            v |= u64::from(x & 0x7f) << s;
            s += 7;
            if x & 0x80 == 0 {
                return v;
            }
        }
    };
    while !b.is_empty() {
        let key = varint(&mut b);
        let (num, wt) = (key >> 3, (key & 7) as u8);
        match wt {
            0 => {
                varint(&mut b);
            }
            2 => {
                let n = varint(&mut b) as usize;
                b = &b[n..];
            }
            1 => b = &b[8..],
            5 => b = &b[4..],
            _ => panic!("wire type {wt}"),
        }
        out.push((num, wt));
    }
    out
}

/// proto/csi.proto declares package csi.v1 and every service of the
/// specification, each with the RPCs kubelet and the sidecars call.
#[test]
fn proto_declares_the_services_and_rpcs() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/csi.proto");
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains("\npackage csi.v1;\n"));
    for svc in [
        "service Identity {",
        "service Controller {",
        "service GroupController {",
        "service SnapshotMetadata {",
        "service Node {",
    ] {
        assert!(text.contains(svc), "{svc}");
    }
    for rpc in [
        "rpc GetPluginInfo(",
        "rpc Probe (",
        "rpc CreateVolume (",
        "rpc ControllerPublishVolume (",
        "rpc ControllerExpandVolume (",
        "rpc ControllerGetVolume (",
        "rpc NodeStageVolume (",
        "rpc NodePublishVolume (",
        "rpc NodeGetVolumeStats (",
        "rpc NodeExpandVolume(",
        "rpc GetSnapshot (",
        "rpc ControllerListVolumeHealth (",
        "rpc ControllerGetVolumeHealth (",
        "rpc NodeGetVolumeHealth (",
        "rpc NodeGetStorageHealth (",
    ] {
        assert!(text.contains(rpc), "{rpc}");
    }
}

#[test]
fn create_volume_request_numbers() {
    let r = CreateVolumeRequest {
        name: "pvc-1".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 1 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block(Mode::SingleNodeWriter)],
        parameters: HashMap::from([("chunkSize".into(), "1MiB".into())]),
        secrets: HashMap::from([("token".into(), "t".into())]),
        ..Default::default()
    };
    let bytes = r.encode_to_vec();
    assert_eq!(bytes[0], ld(1));
    assert_eq!(&bytes[2..7], b"pvc-1");
    let f = fields(&bytes);
    assert_eq!(f, vec![(1, 2), (2, 2), (3, 2), (4, 2), (5, 2)]);
    assert_eq!(CreateVolumeRequest::decode(&bytes[..]).unwrap(), r);
    // CapacityRange: required_bytes = 1 (varint).
    let c = CapacityRange {
        required_bytes: 5,
        limit_bytes: 7,
    }
    .encode_to_vec();
    assert_eq!(c, vec![0x08, 5, 0x10, 7]);
    // VolumeCapability: block = 1, access_mode = 3, mode SINGLE_NODE_WRITER = 1.
    let v = block(Mode::SingleNodeWriter).encode_to_vec();
    assert_eq!(v, vec![ld(1), 0, ld(3), 2, 0x08, 1]);
    assert_eq!(Mode::SingleNodeSingleWriter as i32, 6);
    assert_eq!(Mode::MultiNodeMultiWriter as i32, 5);
}

#[test]
fn node_request_numbers() {
    let stage = NodeStageVolumeRequest {
        staging_target_path: "/s".into(),
        ..Default::default()
    }
    .encode_to_vec();
    assert_eq!(stage, vec![ld(3), 2, b'/', b's']);
    let publish = NodePublishVolumeRequest {
        target_path: "/t".into(),
        ..Default::default()
    }
    .encode_to_vec();
    assert_eq!(publish, vec![ld(4), 2, b'/', b't']);
    let publish = NodePublishVolumeRequest {
        volume_id: "v".into(),
        staging_target_path: "/s".into(),
        target_path: "/t".into(),
        volume_capability: Some(block(Mode::SingleNodeWriter)),
        readonly: true,
        ..Default::default()
    };
    let f = fields(&publish.encode_to_vec());
    assert_eq!(f, vec![(1, 2), (3, 2), (4, 2), (5, 2), (6, 0)]);
    assert_eq!(
        NodePublishVolumeRequest::decode(&publish.encode_to_vec()[..]).unwrap(),
        publish
    );
}

#[test]
fn controller_message_numbers() {
    let p = ControllerPublishVolumeRequest {
        volume_id: "v".into(),
        node_id: "n".into(),
        volume_capability: Some(block(Mode::SingleNodeWriter)),
        readonly: true,
        ..Default::default()
    };
    assert_eq!(
        fields(&p.encode_to_vec()),
        vec![(1, 2), (2, 2), (3, 2), (4, 0)]
    );
    let v = Volume {
        capacity_bytes: 1,
        volume_id: "v".into(),
        ..Default::default()
    };
    assert_eq!(v.encode_to_vec(), vec![0x08, 1, ld(2), 1, b'v']);
    let e = ControllerExpandVolumeResponse {
        capacity_bytes: 2,
        node_expansion_required: true,
    };
    assert_eq!(e.encode_to_vec(), vec![0x08, 2, 0x10, 1]);
    let l = ListVolumesRequest {
        max_entries: 3,
        starting_token: "x".into(),
    };
    assert_eq!(l.encode_to_vec(), vec![0x08, 3, ld(2), 1, b'x']);
    // ProbeResponse.ready is a google.protobuf.BoolValue (a message).
    let pr = ProbeResponse { ready: Some(true) }.encode_to_vec();
    assert_eq!(pr, vec![ld(1), 2, 0x08, 1]);
}

/// Definitions added since the March 2024 master (v1.13.0-rc1): GetSnapshot,
/// the volume health RPCs and their capabilities. A renumbering fails here.
#[test]
fn spec_1_13_numbers() {
    use controller_service_capability::rpc::Type as CtrlRpc;
    use node_service_capability::rpc::Type as NodeRpc;

    // GetSnapshotRequest: snapshot_id = 1, secrets = 2.
    let g = GetSnapshotRequest {
        snapshot_id: "s".into(),
        secrets: HashMap::from([("k".into(), "v".into())]),
    };
    let b = g.encode_to_vec();
    assert_eq!(&b[..3], &[ld(1), 1, b's']);
    assert_eq!(b[3], ld(2));
    assert_eq!(GetSnapshotRequest::decode(&b[..]).unwrap(), g);
    // GetSnapshotResponse: snapshot = 1; Snapshot.group_snapshot_id = 6.
    let r = GetSnapshotResponse {
        snapshot: Some(Snapshot {
            group_snapshot_id: "g".into(),
            ..Default::default()
        }),
    };
    assert_eq!(r.encode_to_vec(), vec![ld(1), 3, ld(6), 1, b'g']);

    // Controller capabilities GET_SNAPSHOT = 15, LIST_VOLUME_HEALTH = 16,
    // GET_VOLUME_HEALTH = 17, through ControllerServiceCapability.rpc = 1,
    // RPC.type = 1.
    for (t, n) in [
        (CtrlRpc::ModifyVolume, 14),
        (CtrlRpc::GetSnapshot, 15),
        (CtrlRpc::ListVolumeHealth, 16),
        (CtrlRpc::GetVolumeHealth, 17),
    ] {
        let c = ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(
                controller_service_capability::Rpc { r#type: t as i32 },
            )),
        };
        assert_eq!(c.encode_to_vec(), vec![ld(1), 2, 0x08, n], "{t:?}");
    }
    // Node capabilities GET_VOLUME_HEALTH = 7, STORAGE_HEALTH = 8.
    for (t, n) in [
        (NodeRpc::VolumeMountGroup, 6),
        (NodeRpc::GetVolumeHealth, 7),
        (NodeRpc::StorageHealth, 8),
    ] {
        let c = NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(
                node_service_capability::Rpc { r#type: t as i32 },
            )),
        };
        assert_eq!(c.encode_to_vec(), vec![ld(1), 2, 0x08, n], "{t:?}");
    }

    // ControllerListVolumeHealthRequest: max_entries = 1, starting_token = 2,
    // secrets = 3.
    let l = ControllerListVolumeHealthRequest {
        max_entries: 2,
        starting_token: "t".into(),
        secrets: HashMap::from([("k".into(), "v".into())]),
    };
    assert_eq!(fields(&l.encode_to_vec()), vec![(1, 0), (2, 2), (3, 2)]);
    // VolumeHealth: volume_id = 1, health_statuses = 2; an entry's
    // status = 1 (DEGRADED = 3), reason = 2, message = 3.
    let h = VolumeHealth {
        volume_id: "v".into(),
        health_statuses: vec![volume_health::VolumeHealthEntry {
            status: VolumeHealthErrorType::Degraded as i32,
            reason: "r".into(),
            message: "m".into(),
        }],
    };
    assert_eq!(
        h.encode_to_vec(),
        vec![
            ld(1),
            1,
            b'v',
            ld(2),
            8,
            0x08,
            3,
            ld(2),
            1,
            b'r',
            ld(3),
            1,
            b'm'
        ]
    );
    assert_eq!(VolumeHealthErrorType::DataLoss as i32, 2);
    // ControllerGetVolumeHealthResponse / NodeGetVolumeHealthResponse:
    // volume_health = 1.
    let c = ControllerGetVolumeHealthResponse {
        volume_health: Some(VolumeHealth::default()),
    };
    assert_eq!(c.encode_to_vec(), vec![ld(1), 0]);
    // NodeGetVolumeHealthRequest: volume_publish_path = 2,
    // staging_target_path = 3.
    let n = NodeGetVolumeHealthRequest {
        volume_id: "v".into(),
        volume_publish_path: "/p".into(),
        staging_target_path: "/s".into(),
    };
    assert_eq!(fields(&n.encode_to_vec()), vec![(1, 2), (2, 2), (3, 2)]);
    assert_eq!(&n.encode_to_vec()[3..7], &[ld(2), 2, b'/', b'p']);
    // NodeGetStorageHealthResponse: backend_health = 1; a backend's
    // status = 1 (STORAGE_DEGRADED = 2), volume_capability = 4.
    let s = NodeGetStorageHealthResponse {
        backend_health: vec![node_get_storage_health_response::StorageBackendHealth {
            status: StorageHealthErrorType::StorageDegraded as i32,
            volume_capability: Some(VolumeCapability::default()),
            ..Default::default()
        }],
    };
    assert_eq!(s.encode_to_vec(), vec![ld(1), 4, 0x08, 2, ld(4), 0]);
    assert_eq!(StorageHealthErrorType::StorageUnreachable as i32, 1);
}

#[test]
fn grpc_paths() {
    assert_eq!(
        csi::pb::controller_server::SERVICE_NAME,
        "csi.v1.Controller"
    );
    assert_eq!(csi::pb::identity_server::SERVICE_NAME, "csi.v1.Identity");
    assert_eq!(csi::pb::node_server::SERVICE_NAME, "csi.v1.Node");
    assert_eq!(
        csi::metrics::method_of("/csi.v1.Controller/GetSnapshot"),
        "GetSnapshot"
    );
}
