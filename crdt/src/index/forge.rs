//! What a compromised member could put on the wire, for adversarial tests (the `forge`
//! feature): any record its keys can sign — a path no honest device would write, any version,
//! any mode — put into a shard exactly as given. Nothing here gets past the admission of an
//! honest replica that the signature alone would not get past; that is what the tests show.

use automerge::{transaction::Transactable, ROOT};

use super::*;

impl FileRecord {
    /// Signs this record as `keys` for `mesh` and `folder` (setting its author).
    pub fn forge_signature(mut self, keys: &DeviceKeys, mesh: &MeshId, folder: &FolderId) -> Self {
        self.author = keys.device_id();
        let bytes = signed_bytes(mesh, folder, &self.path, &self.stored_fields());
        self.signature = keys.sign(SIGNING_CONTEXT, &bytes);
        self
    }
}

impl FolderIndex {
    /// Puts `record` under its path, unchecked, in one change per record signed by `keys`
    /// (as whatever actor this replica has), and returns the changes not yet taken.
    pub fn forge_put(&mut self, keys: &DeviceKeys, records: &[FileRecord]) -> Vec<ShardChange> {
        let (mesh, folder) = (self.mesh, self.folder.clone());
        for record in records {
            let shard = shard_of(&self.folder, &record.path);
            let s = self.shard_mut(shard);
            s.doc
                .put(ROOT, record.path.as_str(), record.encode())
                .expect("a put at the root always works");
            if let Some(hash) = s.doc.commit() {
                let signature = signed::sign_change(keys, &mesh, &folder, shard, &hash);
                s.signatures.insert(hash, signature);
            }
        }
        self.take_local_changes()
    }
}
