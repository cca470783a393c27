"""Images: references, layers and (coming) the registry client, the store and overlay root
filesystems, as a library the CRI server's ImageService will wrap. One module per concern:

- reference: parse and normalise image references as the container tools do
- layers: apply one layer (tar, gzip, zstd) to its own directory, safely: an image is hostile input
- manifest: OCI and Docker manifests, indexes and configs as plain data
- store: content-addressed blobs, unpacked layers, image metadata; offline import of OCI layouts
- registry: the OCI distribution client (httpx) and `pull`
- cli: `stockade image`

Still to come (issue 11): overlay root filesystems and `stockade run --image`, docker-archive
import and OCI export, bearer-auth tests against a token server, progress bars, the benchmark.
"""
