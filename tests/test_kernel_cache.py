"""The numba cache guard of lowprec.kernels (kernels/__init__.py)."""

from lowprec import kernels


def test_stale_cache_files_are_dropped_when_any_kernel_source_changes(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(kernels, "_cache_dir", lambda: str(tmp_path))
    ours = tmp_path / "int8_conv._vnni_job-141.py311.1.nbc"
    index = tmp_path / "int8_conv._vnni_job-141.py311.nbi"
    other = tmp_path / "somebody_else.f-3.py311.nbi"
    for f in (ours, index, other):
        f.write_bytes(b"x")
    (tmp_path / "lowprec-kernels.stamp").write_text("an older source tree\n")
    kernels._drop_stale_cache()
    assert not ours.exists()
    assert not index.exists()
    assert other.exists()  # not one of this package's modules
    stamp = (tmp_path / "lowprec-kernels.stamp").read_text().strip()
    assert len(stamp) == 64
    # same sources: nothing more is removed
    ours.write_bytes(b"x")
    kernels._drop_stale_cache()
    assert ours.exists()
    # the stamp is the one kernels exposes (the sparse cost model keys on it)
    assert stamp == kernels.SOURCE_STAMP == kernels._drop_stale_cache()
