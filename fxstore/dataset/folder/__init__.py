"""The output-folder protocol, one plainly named module per concept (import them directly):

* ``names`` -- every file and folder name fxstore gives an entry of the output folder;
* ``files`` -- atomic writes, safe reads, the early checks (writable, free space), ``OSError`` translation;
* ``checksums`` -- the digests of data files and of a run's identity;
* ``lock`` -- one writer per folder (``flock``);
* ``record`` -- the run record, written before any data file;
* ``progress`` -- the per-shard progress markers of a run in progress;
* ``ownership`` -- which entries fxstore wrote, the staging folder;
* ``manifest`` -- the manifest: written last, validated before use.

The data files themselves belong to the formats (``dataset.formats``), which these modules ask.
This ``__init__`` imports nothing, so that the formats can build on the low modules (names,
files, checksums) while ownership and the manifest build on the formats.
"""
