"""Images: references, layers and (coming) the registry client, the store and overlay root
filesystems, as a library the CRI server's ImageService will wrap. One module per concern:

- reference: parse and normalise image references as the container tools do
- layers: apply one layer (tar, gzip, zstd) to its own directory, safely: an image is hostile input

Still to come (issue 11): the registry client, manifests, the content-addressed store, overlay
root filesystems, import/export and `stockade image` / `stockade run --image`.
"""
