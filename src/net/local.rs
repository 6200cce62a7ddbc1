//! An in-process network: each node registers its federation router under its server name;
//! requests are handed to the destination's router with the sender authenticated, as the
//! libp2p transport does. Links can be cut and restored.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use axum::{body::Body, Router};
use bytes::Bytes;
use http_body_util::BodyExt;
use ruma::{OwnedServerName, ServerName};
use tower::ServiceExt;

use crate::{
    api::ruma_wrapper::AuthenticatedPeer,
    core::federation::{BoxFuture, Transport, TransportError},
};

/// The nodes of one in-process network.
#[derive(Default)]
pub struct LocalNetwork {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    routers: BTreeMap<OwnedServerName, Router>,
    /// Cores to tell when a link comes back (as a real connection would).
    cores: BTreeMap<OwnedServerName, std::sync::Weak<crate::core::Core>>,
    /// Cut links, as unordered pairs (a < b).
    cut: BTreeSet<(OwnedServerName, OwnedServerName)>,
}

fn pair(a: &ServerName, b: &ServerName) -> (OwnedServerName, OwnedServerName) {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

impl LocalNetwork {
    /// A new, empty network.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Attach a node's federation router.
    pub fn attach(&self, name: &ServerName, router: Router) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).routers.insert(name.to_owned(), router);
    }

    /// Attach a node's core too, so restoring a link flushes both queues at once (what a new
    /// libp2p connection does in production).
    pub fn attach_core(&self, core: &Arc<crate::core::Core>) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cores
            .insert(core.server_name().to_owned(), Arc::downgrade(core));
    }

    /// Remove a node (it crashed or left).
    pub fn detach(&self, name: &ServerName) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).routers.remove(name);
    }

    /// Cut (`up = false`) or restore the link between two nodes.
    pub fn set_link(&self, a: &ServerName, b: &ServerName, up: bool) {
        let (ca, cb) = {
            let mut i = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if up {
                i.cut.remove(&pair(a, b));
            } else {
                i.cut.insert(pair(a, b));
            }
            (i.cores.get(a).and_then(|w| w.upgrade()), i.cores.get(b).and_then(|w| w.upgrade()))
        };
        if up {
            if let Some(c) = ca {
                c.peer_up(b);
            }
            if let Some(c) = cb {
                c.peer_up(a);
            }
        }
    }

    /// The transport a node named `me` uses on this network.
    pub fn transport(self: &Arc<Self>, me: &ServerName) -> Arc<dyn Transport> {
        Arc::new(LocalTransport { net: self.clone(), me: me.to_owned() })
    }
}

struct LocalTransport {
    net: Arc<LocalNetwork>,
    me: OwnedServerName,
}

impl Transport for LocalTransport {
    fn send(
        &self,
        dest: OwnedServerName,
        req: http::Request<Bytes>,
    ) -> BoxFuture<'static, Result<http::Response<Bytes>, TransportError>> {
        let route = {
            let i = self.net.inner.lock().unwrap_or_else(|e| e.into_inner());
            if i.cut.contains(&pair(&self.me, &dest)) {
                None
            } else {
                i.routers.get(&dest).cloned()
            }
        };
        let me = self.me.clone();
        Box::pin(async move {
            let Some(router) = route else {
                return Err(TransportError::Unreachable(dest, "no link".into()));
            };
            let mut req = req.map(Body::from);
            req.extensions_mut().insert(AuthenticatedPeer(me));
            let res = router.oneshot(req).await.map_err(|e| TransportError::Failed(dest.clone(), e.to_string()))?;
            let (parts, body) = res.into_parts();
            let bytes = body.collect().await.map_err(|e| TransportError::Failed(dest, e.to_string()))?.to_bytes();
            Ok(http::Response::from_parts(parts, bytes))
        })
    }
}
