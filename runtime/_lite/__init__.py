"""Stand-ins for standard-library modules on the container start path.

Every `stockade-oci` call is a new interpreter, and some stdlib modules cost far more to import
than the container start does with them (bench/README.md, "The start path", has the figures).
Each module here is named after the one it replaces and does the subset the runtime needs, with
the same results; tests/test_lite.py checks each against the stdlib module:

- json: loads/dumps through CPython's C accelerator alone
- dataclasses: `record` and `field` (init, repr, eq from closures, no exec)
- hashlib: sha256 from CPython's own module, without OpenSSL
- contextlib: suppress
- argparse: the table-driven parser for the OCI lifecycle verbs (argparse for everything else)
"""
