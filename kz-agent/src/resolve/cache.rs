//! An optional TTL cache in front of any resolver (`cache_ttl = SECONDS`). Only successful
//! lookups are cached, in memory, keyed by the whole request; values stay [`Secret`]s.

use super::{ResolveError, Resolver, SecretRequest};
use crate::secret::Secret;
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bounds memory when references are attacker-influenced (a PDP resolves what agents ask for).
const MAX_ENTRIES: usize = 4096;

pub struct CachedResolver {
    inner: Arc<dyn Resolver>,
    ttl: Duration,
    entries: Mutex<HashMap<SecretRequest, (Secret, Instant)>>,
}

impl std::fmt::Debug for CachedResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedResolver")
            .field("inner", &self.inner)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl CachedResolver {
    pub fn new(inner: Arc<dyn Resolver>, ttl: Duration) -> Self {
        Self {
            inner,
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lookup(&self, request: &SecretRequest) -> Option<Secret> {
        let entries = self.entries.lock().ok()?;
        entries
            .get(request)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(v, _)| v.clone())
    }

    fn store(&self, request: &SecretRequest, value: &Secret) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            entries.retain(|_, (_, at)| at.elapsed() < ttl);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(request.clone(), (value.clone(), Instant::now()));
    }
}

impl Resolver for CachedResolver {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn resolve<'a>(
        &'a self,
        request: &'a SecretRequest,
    ) -> BoxFuture<'a, Result<Secret, ResolveError>> {
        Box::pin(async move {
            if let Some(hit) = self.lookup(request) {
                return Ok(hit);
            }
            let value = self.inner.resolve(request).await?;
            self.store(request, &value);
            Ok(value)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug, Default)]
    struct Counting(AtomicU32);

    impl Resolver for Counting {
        fn kind(&self) -> &'static str {
            "counting"
        }
        fn resolve<'a>(
            &'a self,
            _request: &'a SecretRequest,
        ) -> BoxFuture<'a, Result<Secret, ResolveError>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { Ok(Secret::new(format!("v{n}"))) })
        }
    }

    #[tokio::test]
    async fn caches_until_ttl_expires() {
        let inner = Arc::new(Counting::default());
        let cached = CachedResolver::new(inner.clone(), Duration::from_millis(200));
        let req = SecretRequest::new("a");
        assert_eq!(cached.resolve(&req).await.unwrap().expose(), "v0");
        assert_eq!(cached.resolve(&req).await.unwrap().expose(), "v0");
        assert_eq!(
            cached
                .resolve(&SecretRequest::new("b"))
                .await
                .unwrap()
                .expose(),
            "v1"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(cached.resolve(&req).await.unwrap().expose(), "v2");
    }
}
