"""Writing without losing data: atomic files and directories, and the workdir lock."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ddim_jax import files


def test_atomic_write_syncs_replaces_and_leaves_nothing_behind_on_error(monkeypatch, tmp_path):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    path = tmp_path / "new" / "dir" / "f.bin"  # the folder is created
    files.atomic_write(str(path), lambda f: f.write(b"first"))
    assert path.read_bytes() == b"first" and len(synced) == 1

    def fail_halfway(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.atomic_write(str(path), fail_halfway)
    assert path.read_bytes() == b"first"  # the old file is untouched
    assert os.listdir(path.parent) == ["f.bin"]  # and no temporary file is left
    files.atomic_write(str(path), lambda f: np.savez(f, a=np.arange(3)))  # np.savez adds no ".npz" to a file
    with np.load(path) as z:
        np.testing.assert_array_equal(z["a"], np.arange(3))
    assert os.listdir(path.parent) == ["f.bin"] and len(synced) == 2



def test_atomic_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = files.write_json(str(tmp_path / "a.json"), {"x": 1})
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_replace_dir_refuses_keeps_and_swaps(tmp_path):
    dst = tmp_path / "model"
    with files.replace_dir(str(dst), overwrite=False) as tmp:
        (open(os.path.join(tmp, "f"), "w")).write("one")
    assert (dst / "f").read_text() == "one"
    with pytest.raises(FileExistsError, match="pass overwrite"):
        with files.replace_dir(str(dst), overwrite=False):
            pass
    # A failure while the new copy is written leaves the old one as it was, and no debris.
    with pytest.raises(RuntimeError, match="halfway"):
        with files.replace_dir(str(dst), overwrite=True) as tmp:
            open(os.path.join(tmp, "f"), "w").write("two")
            raise RuntimeError("halfway")
    assert (dst / "f").read_text() == "one" and sorted(os.listdir(tmp_path)) == ["model"]
    with files.replace_dir(str(dst), overwrite=True) as tmp:
        open(os.path.join(tmp, "f"), "w").write("two")
    assert (dst / "f").read_text() == "two" and sorted(os.listdir(tmp_path)) == ["model"]
    # Something that is not what we write is never replaced.
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff")
    with pytest.raises(FileExistsError, match="refusing"):
        with files.replace_dir(str(other), overwrite=True, may_replace=lambda p: False):
            pass
    assert (other / "cat.jpg").exists()


def test_replace_dir_through_a_symlink_replaces_its_target_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "disk" / "model"
    target.mkdir(parents=True)
    (target / "f").write_text("one")
    link = tmp_path / "models" / "model"
    link.parent.mkdir()
    link.symlink_to(target)
    with files.replace_dir(str(link), overwrite=True) as tmp:
        open(os.path.join(tmp, "f"), "w").write("two")
    assert link.is_symlink() and (link / "f").read_text() == "two"
    assert os.listdir(link.parent) == ["model"] and os.listdir(target.parent) == ["model"]  # no ".old" left


def test_files_written_into_a_replaced_dir_get_the_usual_permissions(tmp_path):
    from ddim_jax import models

    old = os.umask(0o022)
    try:
        with files.replace_dir(str(tmp_path / "d"), overwrite=False) as tmp:
            fd = os.open(os.path.join(tmp, "private"), os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors writes
            os.close(fd)
        spec = models.ModelSpec("unet", dict(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                                             dropout=0.0, resamp_with_conv=True, norm_groups=8), 8, 3,
                                {"name": "linear", "num_timesteps": 10}, "epsilon")
        params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), spec.param_shapes())
        model = models.save(str(tmp_path / "m"), spec, params)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "d" / "private").st_mode & 0o777 == 0o644
    assert {f: os.stat(os.path.join(model, f)).st_mode & 0o777 for f in os.listdir(model)} == {
        models.PARAMS_FILE: 0o644, models.SPEC_FILE: 0o644}


def test_a_second_holder_is_refused_with_the_holders_pid(tmp_path):
    with files.WorkdirLock(str(tmp_path)):
        with pytest.raises(files.WorkdirInUse, match=rf"in use by pid {os.getpid()} on host "):
            files.WorkdirLock(str(tmp_path)).acquire()
    with files.WorkdirLock(str(tmp_path)):  # released: free again
        pass


def test_a_lock_left_by_a_killed_process_is_stale_and_taken_over(tmp_path):
    holder = textwrap.dedent(f"""
        import sys, time
        from ddim_jax.files import WorkdirLock
        WorkdirLock({str(tmp_path)!r}).acquire()
        print("held", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(files.WorkdirInUse, match=rf"pid {proc.pid} "):
            files.WorkdirLock(str(tmp_path)).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert "pid" in (tmp_path / ".lock").read_text()  # the dead holder's record is still there ...
    with files.WorkdirLock(str(tmp_path)):  # ... and the lock is free
        pass


def test_free_disk_and_memory_are_positive(tmp_path):
    assert files.free_disk(str(tmp_path / "not" / "yet")) > 0
    assert files.available_memory() > 0


def test_the_compilation_cache_setting(tmp_path, monkeypatch):
    import jax

    from ddim_jax import cache

    old = jax.config.jax_compilation_cache_dir
    old_threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        assert cache.enable_compilation_cache("") is None and jax.config.jax_compilation_cache_dir == old
        assert cache.enable_compilation_cache(str(tmp_path)) == str(tmp_path)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path)
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        monkeypatch.setenv("DDIM_JAX_CACHE", str(tmp_path / "c"))
        assert cache.enable_compilation_cache() == str(tmp_path / "c" / "jax")
        # The minimum compile time of a kept program: 0.5 s, or what the user gave JAX in its variable.
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 3.0)
        cache.enable_compilation_cache(str(tmp_path))
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.5
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.25")
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.25)  # as JAX read it when it started
        cache.enable_compilation_cache(str(tmp_path))
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.25
    finally:
        jax.config.update("jax_compilation_cache_dir", old)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old_threshold)
