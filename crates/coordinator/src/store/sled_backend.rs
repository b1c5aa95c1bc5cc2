//! The embedded default: one sled database in the data dir, one sled tree
//! per [`Tree`], every transaction over all of them (sled's optimistic
//! transactions retry on conflict), flushed (fsync) before a durable commit
//! returns. One process at a time: sled locks the directory.

use super::StoreError;
use super::backend::{Aborted, Backend, Entry, Tree, Txn};
use sled::transaction::{
    ConflictableTransactionError, TransactionError, Transactional, TransactionalTree, UnabortableTransactionError,
};
use std::path::{Path, PathBuf};

pub struct SledBackend {
    path: PathBuf,
    db: sled::Db,
    /// In [`Tree::ALL`] order.
    trees: Vec<sled::Tree>,
}

/// How long [`SledBackend::close`] waits for sled's threads to release the lock.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether some open file description holds sled's lock (an `flock` on the
/// `db` file, as sled takes it). A missing file is not locked.
pub(crate) fn lock_is_held(dir: &Path) -> bool {
    let Ok(file) = std::fs::OpenOptions::new().read(true).write(true).open(dir.join("db")) else {
        return false;
    };
    match file.try_lock() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(std::fs::TryLockError::WouldBlock) => true,
        Err(std::fs::TryLockError::Error(_)) => false,
    }
}

impl SledBackend {
    pub fn open(path: &Path) -> Result<SledBackend, StoreError> {
        let db = sled::Config::new().path(path).open().map_err(|source| {
            if lock_is_held(path) {
                StoreError::Locked { path: path.to_path_buf() }
            } else {
                StoreError::Open { path: path.to_path_buf(), source }
            }
        })?;
        let trees = Tree::ALL.iter().map(|t| db.open_tree(t.name())).collect::<Result<Vec<_>, _>>()?;
        Ok(SledBackend { path: path.to_path_buf(), db, trees })
    }

    fn tree(&self, t: Tree) -> &sled::Tree {
        &self.trees[t as usize]
    }
}

struct SledTxn<'a> {
    views: &'a [TransactionalTree],
    conflict: bool,
    storage: Option<sled::Error>,
}

impl SledTxn<'_> {
    fn note<T>(&mut self, r: Result<T, UnabortableTransactionError>) -> Result<T, StoreError> {
        r.map_err(|e| match e {
            UnabortableTransactionError::Conflict => {
                self.conflict = true;
                StoreError::Conflict
            }
            UnabortableTransactionError::Storage(e) => {
                self.storage = Some(e.clone());
                StoreError::Sled(e)
            }
        })
    }
}

impl Txn for SledTxn<'_> {
    fn get(&mut self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let r = self.views[tree as usize].get(key);
        Ok(self.note(r)?.map(|v| v.to_vec()))
    }
    fn put(&mut self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let r = self.views[tree as usize].insert(key, value);
        self.note(r).map(|_| ())
    }
    fn remove(&mut self, tree: Tree, key: &[u8]) -> Result<(), StoreError> {
        let r = self.views[tree as usize].remove(key);
        self.note(r).map(|_| ())
    }
}

impl Backend for SledBackend {
    fn kind(&self) -> rekey_types::v1::StoreBackend {
        rekey_types::v1::StoreBackend::Sled
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree(tree).get(key)?.map(|v| v.to_vec()))
    }

    fn scan(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        self.tree(tree)
            .scan_prefix(prefix)
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Into::into))
            .collect()
    }

    fn last(&self, tree: Tree) -> Result<Option<Entry>, StoreError> {
        Ok(self.tree(tree).last()?.map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn transaction(
        &self,
        durable: bool,
        f: &mut dyn FnMut(&mut dyn Txn) -> Result<(), Aborted>,
    ) -> Result<(), StoreError> {
        // sled wants `Fn`; the closure runs on this thread, one call at a time.
        let f = std::cell::RefCell::new(f);
        let r = self.trees.as_slice().transaction(|views| {
            let mut tx = SledTxn { views, conflict: false, storage: None };
            let out = (f.borrow_mut())(&mut tx);
            if tx.conflict {
                return Err(ConflictableTransactionError::Conflict);
            }
            if let Some(e) = tx.storage {
                return Err(ConflictableTransactionError::Storage(e));
            }
            out.map_err(|Aborted| ConflictableTransactionError::Abort(()))
        });
        match r {
            Ok(()) if durable => self.flush(),
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(())) => Err(StoreError::Aborted),
            Err(TransactionError::Storage(e)) => Err(StoreError::Sled(e)),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn close(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

impl SledBackend {
    /// Waits until sled's threads have released the directory (after every
    /// handle was dropped).
    pub(crate) fn wait_released(path: &Path) -> Result<(), StoreError> {
        let start = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(1);
        while lock_is_held(path) {
            if start.elapsed() > CLOSE_WAIT {
                return Err(StoreError::StillHeld { path: path.to_path_buf(), waited: start.elapsed() });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(50));
        }
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}
