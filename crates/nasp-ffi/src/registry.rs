//! The handle registry: every object C can name lives here, behind an id
//! `kind << 56 | counter`. The counter never repeats, so a freed id stays
//! unknown forever (no ABA) and a wrong kind is told from the top byte.
//! A call clones the object's `Arc` under the lock and releases the lock
//! before it blocks; a free removes the entry, and the memory goes with
//! the last clone. The lock is never held across a call into the mesh.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use crate::buf::BufState;
use crate::http::ResponseState;
use crate::listener::ListenerState;
use crate::mesh::MeshState;
use crate::request::RequestState;
use crate::status::{FfiError, NaspStatus, Result};
use crate::tcp::ConnState;

/// What a handle names, in its top byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A `NaspMesh`.
    Mesh = 1,
    /// A `NaspResponse`.
    Response = 2,
    /// A `NaspBuf`.
    Buf = 3,
    /// A `NaspConn`.
    Conn = 4,
    /// A `NaspListener`.
    Listener = 5,
    /// A `NaspRequest`.
    Request = 6,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Mesh => "mesh",
            Kind::Response => "response",
            Kind::Buf => "buffer",
            Kind::Conn => "connection",
            Kind::Listener => "listener",
            Kind::Request => "request",
        }
    }

    fn of(id: u64) -> Option<Self> {
        match id >> 56 {
            1 => Some(Kind::Mesh),
            2 => Some(Kind::Response),
            3 => Some(Kind::Buf),
            4 => Some(Kind::Conn),
            5 => Some(Kind::Listener),
            6 => Some(Kind::Request),
            _ => None,
        }
    }
}

/// A registered object.
pub(crate) enum Object {
    Mesh(Arc<MeshState>),
    Response(Arc<ResponseState>),
    Buf(Arc<BufState>),
    Conn(Arc<ConnState>),
    Listener(Arc<ListenerState>),
    Request(Arc<RequestState>),
}

impl Object {
    /// Wakes the calls blocked on this object (they return `CLOSED`);
    /// called as it leaves the registry, before its last `Arc` goes.
    pub(crate) fn close(&self) {
        match self {
            Object::Conn(c) => c.closer.close(),
            Object::Listener(l) => l.closer.close(),
            Object::Request(r) => r.closer.close(),
            Object::Response(r) => r.closer.close(),
            Object::Mesh(_) | Object::Buf(_) => {}
        }
    }
}

/// A flag that wakes every call blocked on one object when it is freed.
pub(crate) struct Closer(tokio::sync::watch::Sender<bool>);

impl Closer {
    pub(crate) fn new() -> Self {
        Self(tokio::sync::watch::channel(false).0)
    }

    pub(crate) fn close(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once `close` was called (at once if it was).
    pub(crate) async fn closed(&self) {
        let mut rx = self.0.subscribe();
        // The sender is `self`, alive for the whole wait.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// `op`, or `CLOSED` ("the {what} was closed") as soon as the object is
    /// freed by another thread.
    pub(crate) async fn guard<T>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::select! {
            r = op => r,
            () = self.closed() => Err(FfiError::new(
                NaspStatus::Closed,
                format!("the {what} was closed by another call"),
            )),
        }
    }
}

struct Entry {
    object: Object,
    /// The mesh this object belongs to (0: none); freed with it.
    parent: u64,
}

static NEXT: AtomicU64 = AtomicU64::new(1);
static REGISTRY: LazyLock<Mutex<HashMap<u64, Entry>>> = LazyLock::new(Default::default);

fn table() -> std::sync::MutexGuard<'static, HashMap<u64, Entry>> {
    // A panic caught at the boundary may have poisoned the lock; the map
    // itself is consistent after every single insert or remove.
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Registers `object` and returns its new id.
pub(crate) fn insert(kind: Kind, object: Object, parent: u64) -> u64 {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let id = (kind as u64) << 56 | (n & ((1 << 56) - 1));
    table().insert(id, Entry { object, parent });
    id
}

/// Registers `object` as a child of the mesh `parent` and returns its new
/// id, unless that mesh was freed meanwhile (by another thread, while the
/// call that made the object ran): then the object is closed and dropped,
/// and the call returns `CLOSED`, so no child outlives its mesh.
pub(crate) fn insert_child(kind: Kind, object: Object, parent: u64) -> Result<u64> {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let id = (kind as u64) << 56 | (n & ((1 << 56) - 1));
    let mut t = table();
    if !t.contains_key(&parent) {
        drop(t);
        object.close();
        drop(object);
        return Err(FfiError::new(
            NaspStatus::Closed,
            "the mesh was freed while this call ran",
        ));
    }
    t.insert(id, Entry { object, parent });
    Ok(id)
}

fn unknown(id: u64, want: Kind) -> FfiError {
    let msg = match (id, Kind::of(id)) {
        (0, _) => format!("{} handle is 0 (no handle)", want.name()),
        (_, Some(k)) if k != want => {
            format!("handle {id:#x} is a {}, not a {}", k.name(), want.name())
        }
        _ => format!("{} handle {id:#x} is unknown or already freed", want.name()),
    };
    FfiError::new(NaspStatus::InvalidHandle, msg)
}

/// The mesh `id` names.
pub(crate) fn mesh(id: u64) -> Result<Arc<MeshState>> {
    match table().get(&id).map(|e| &e.object) {
        Some(Object::Mesh(m)) => Ok(m.clone()),
        _ => Err(unknown(id, Kind::Mesh)),
    }
}

/// The response `id` names, with its mesh's id.
pub(crate) fn response(id: u64) -> Result<(Arc<ResponseState>, u64)> {
    match table().get(&id) {
        Some(Entry {
            object: Object::Response(r),
            parent,
        }) => Ok((r.clone(), *parent)),
        _ => Err(unknown(id, Kind::Response)),
    }
}

/// The connection `id` names, with its mesh's id.
pub(crate) fn conn(id: u64) -> Result<(Arc<ConnState>, u64)> {
    match table().get(&id) {
        Some(Entry {
            object: Object::Conn(c),
            parent,
        }) => Ok((c.clone(), *parent)),
        _ => Err(unknown(id, Kind::Conn)),
    }
}

/// The listener `id` names, with its mesh's id.
pub(crate) fn listener(id: u64) -> Result<(Arc<ListenerState>, u64)> {
    match table().get(&id) {
        Some(Entry {
            object: Object::Listener(l),
            parent,
        }) => Ok((l.clone(), *parent)),
        _ => Err(unknown(id, Kind::Listener)),
    }
}

/// The streaming request `id` names, with its mesh's id.
pub(crate) fn request(id: u64) -> Result<(Arc<RequestState>, u64)> {
    match table().get(&id) {
        Some(Entry {
            object: Object::Request(r),
            parent,
        }) => Ok((r.clone(), *parent)),
        _ => Err(unknown(id, Kind::Request)),
    }
}

/// The buffer `id` names.
pub(crate) fn buf(id: u64) -> Result<Arc<BufState>> {
    match table().get(&id).map(|e| &e.object) {
        Some(Object::Buf(b)) => Ok(b.clone()),
        _ => Err(unknown(id, Kind::Buf)),
    }
}

/// Removes `id` if it names a `kind`; the object is returned so that it is
/// dropped outside the lock.
pub(crate) fn remove(id: u64, kind: Kind) -> Result<Object> {
    let mut t = table();
    if Kind::of(id) != Some(kind) || !t.contains_key(&id) {
        return Err(unknown(id, kind));
    }
    let object = t
        .remove(&id)
        .expect("invariant: checked under the same lock")
        .object;
    drop(t);
    object.close();
    Ok(object)
}

/// Removes every object whose parent is `parent`, returned to be dropped
/// outside the lock.
pub(crate) fn remove_children(parent: u64) -> Vec<Object> {
    let mut t = table();
    let ids: Vec<u64> = t
        .iter()
        .filter(|(_, e)| e.parent == parent)
        .map(|(id, _)| *id)
        .collect();
    let objects: Vec<Object> = ids
        .into_iter()
        .filter_map(|id| t.remove(&id).map(|e| e.object))
        .collect();
    drop(t);
    objects.iter().for_each(Object::close);
    objects
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a_buf() -> Object {
        Object::Buf(Arc::new(BufState::new(b"x".to_vec())))
    }

    #[test]
    fn freed_ids_stay_unknown_and_kinds_are_checked() {
        let id = insert(Kind::Buf, a_buf(), 0);
        assert!(buf(id).is_ok());
        let e = mesh(id).err().expect("a buffer is not a mesh");
        assert_eq!(e.status, NaspStatus::InvalidHandle);
        assert!(
            e.message.contains("is a buffer, not a mesh"),
            "{}",
            e.message
        );
        assert!(remove(id, Kind::Mesh).is_err(), "wrong kind is not removed");
        assert!(remove(id, Kind::Buf).is_ok());
        let e = remove(id, Kind::Buf).err().expect("double free");
        assert!(e.message.contains("already freed"), "{}", e.message);
        assert!(buf(0).err().expect("zero").message.contains("is 0"));
        let next = insert(Kind::Buf, a_buf(), 0);
        assert_ne!(next, id, "ids are never reused");
        remove(next, Kind::Buf).expect("free");
    }

    #[test]
    fn children_go_with_their_parent() {
        let parent = 1 << 56 | 0xff_ffff_ffff;
        let a = insert(Kind::Buf, a_buf(), parent);
        let b = insert(Kind::Buf, a_buf(), 0);
        assert_eq!(remove_children(parent).len(), 1);
        assert!(buf(a).is_err());
        assert!(buf(b).is_ok());
        remove(b, Kind::Buf).expect("free");
    }

    #[test]
    fn concurrent_frees_succeed_once() {
        let id = insert(Kind::Buf, a_buf(), 0);
        let ok: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(move || remove(id, Kind::Buf).is_ok()))
                .collect();
            hs.into_iter().map(|h| usize::from(h.join().unwrap())).sum()
        });
        assert_eq!(ok, 1);
    }
}
