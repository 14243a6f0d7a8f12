"""A change to any jitted source drops the whole package's Numba cache, not only that file's."""

from __future__ import annotations

from simulator import jitcache


def test_edit_to_an_imported_source_clears_every_cache_file(tmp_path, monkeypatch):
    pkg = tmp_path / "simulator"
    (pkg / "core" / "__pycache__").mkdir(parents=True)
    (pkg / "workload").mkdir()
    (pkg / "costmodel.py").write_text("A = 1\n")
    (pkg / "core" / "loop.py").write_text("B = 2\n")
    cached = [pkg / "core" / "__pycache__" / "loop.run_events-1.py311.nbi",
              pkg / "core" / "__pycache__" / "loop.run_events-1.py311.1.nbc"]
    monkeypatch.setattr(jitcache, "PACKAGE", pkg)
    monkeypatch.setattr(jitcache, "STAMP", pkg / "__pycache__" / "numba_sources.sha256")
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    jitcache.invalidate_stale_cache()  # first run: writes the stamp
    for f in cached:
        f.write_text("compiled")
    assert not jitcache.invalidate_stale_cache()  # nothing changed: cache kept
    assert all(f.exists() for f in cached)
    (pkg / "costmodel.py").write_text("A = 3\n")  # loop.py itself is untouched
    assert jitcache.invalidate_stale_cache()
    assert not any(f.exists() for f in cached)
    assert not jitcache.invalidate_stale_cache()


def test_numba_cache_dir_is_left_alone(monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/somewhere/else")
    assert not jitcache.invalidate_stale_cache()
