"""`python bench/storage.py`: storage under load on SQLite and PostgreSQL. The code is in
`bench/storage_bench.py` (mypy sees bench/ as top-level modules, where one named
`storage` would shadow the storage package); this file only runs it."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).with_name("storage_bench.py")), run_name="__main__")
