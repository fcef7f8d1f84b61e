"""Teacher-logit cache: equivalence with the online teacher, fingerprints, bad stores, top-k error."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cache_teacher
from common.errors import RuntimeConfigError
import train
from pipelines import available_pipelines, build_loaders
from training.config import load_config
from training.losses import crld_loss
from training.loop import Trainer
from training.runtime import seed_everything
from training.teacher_cache import CacheError, compress_topk, rebuild_topk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teacher_ckpt(random_teacher):
    return random_teacher(seed=1)


def overrides(demo_root, teacher_ckpt, *extra):
    return [f"data.root={demo_root}", "data.subset=96", "pipeline.batch_size=32", "pipeline.val_batch_size=96",
            "pipeline.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=0", "run.progress=false",
            "run.amp=off", "model.name=resnet8", "teacher.name=resnet8", f"teacher.ckpt={teacher_ckpt}",
            # gates open for every sample, so the KD terms are compared, not zeros (the teacher is random)
            "method.tau_w=0", "method.tau_s=0", *extra]


def build(cache_dir, demo_root, teacher_ckpt, *extra, epochs=2, precision="fp32", topk=0):
    return cache_teacher.main(["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), "--out", str(cache_dir),
                               "--epochs", str(epochs), "--precision", precision, "--topk", str(topk),
                               *overrides(demo_root, teacher_ckpt, *extra)])


@pytest.fixture(scope="module")
def fp32_cache(demo_root, teacher_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("cache") / "fp32"
    build(d, demo_root, teacher_ckpt)
    return d


def step_losses(demo_root, teacher_ckpt, tmp_path, *extra):
    """Per-step losses and final weights of a 2-epoch CRLD run driven step by step."""
    cfg = load_config(os.path.join(ROOT, "configs/demo/crld.yaml"),
                      overrides(demo_root, teacher_ckpt, f"run.out_dir={tmp_path}", *extra))
    seed_everything(cfg.run.seed, False)
    tl, vl, src = build_loaders(cfg, torch.device("cpu"))
    tr = Trainer(cfg, torch.device("cpu"), str(tmp_path), tl, vl, train_source=src)
    losses, st = [], tr.students[0]
    for epoch in range(cfg.optim.epochs):
        st.epoch = epoch
        for batch, cached in tr.epoch_batches(epoch):
            out, _, _ = tr.train_step(batch, cached)[0]
            losses.append({k: float(v.detach()) for k, v in out.items()})
    return losses, st.student.state_dict()


def test_fp32_cache_gives_the_online_loss_at_every_step(demo_root, teacher_ckpt, fp32_cache, tmp_path):
    online, w_online = step_losses(demo_root, teacher_ckpt, tmp_path / "a")
    cached, w_cached = step_losses(demo_root, teacher_ckpt, tmp_path / "b", "teacher.source=cache",
                                   f"teacher.cache={fp32_cache}")
    assert len(online) == len(cached) == 2 * 3
    assert all(x["kd_wv"] > 0 and x["kd_cv"] > 0 for x in online)
    for a, b in zip(online, cached):
        for k in ("loss", "ce", "kd_wv", "kd_cv"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
    for k, v in w_online.items():
        if v.is_floating_point():
            torch.testing.assert_close(w_cached[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif("dali" not in available_pipelines(), reason="DALI is not installed")
def test_cache_built_with_torch_serves_a_dali_run(demo_root, teacher_ckpt, fp32_cache, tmp_path):
    """Replay across backends: the views DALI makes for (seed, epoch, index) are the ones cached."""
    online, _ = step_losses(demo_root, teacher_ckpt, tmp_path / "a", "pipeline.name=dali")
    cached, _ = step_losses(demo_root, teacher_ckpt, tmp_path / "b", "pipeline.name=dali", "teacher.source=cache",
                            f"teacher.cache={fp32_cache}")
    for a, b in zip(online, cached):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_fp16_cache_difference_is_small(demo_root, teacher_ckpt, fp32_cache, tmp_path):
    d = tmp_path / "fp16"
    build(d, demo_root, teacher_ckpt, precision="fp16", epochs=1)
    full = np.load(fp32_cache / "epoch_0000" / "logits.npy")
    half = np.load(d / "epoch_0000" / "logits.npy")
    assert half.dtype == np.float16 and (d / "epoch_0000" / "logits.npy").stat().st_size < 0.6 * (
        fp32_cache / "epoch_0000" / "logits.npy").stat().st_size
    np.testing.assert_allclose(half.astype(np.float32), full, rtol=1e-3, atol=1e-3)


def test_train_cli_from_cache_never_builds_the_teacher(demo_root, teacher_ckpt, fp32_cache, tmp_path, monkeypatch):
    import training.loop as loop
    import training.student as student
    real = loop.create_model
    built = []
    for module in (loop, student):
        monkeypatch.setattr(module, "create_model", lambda name, nc: built.append(name) or real(name, nc))
    summary = train.main(["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), *overrides(
        demo_root, "", f"run.out_dir={tmp_path}", "teacher.source=cache", f"teacher.cache={fp32_cache}")])
    assert built == ["resnet8"]  # the student only
    assert summary["epochs"] == 2 and "teacher_top1" in summary


def test_a_group_reads_the_cache_once_and_each_student_equals_its_solo_cached_run(demo_root, teacher_ckpt, fp32_cache,
                                                                                  tmp_path, monkeypatch):
    from training.teacher_cache import TeacherCache
    reads, real = [], TeacherCache._read
    monkeypatch.setattr(TeacherCache, "_read", lambda self, *a: reads.append(1) or real(self, *a))
    argv = ["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), *overrides(
        demo_root, teacher_ckpt, f"run.out_dir={tmp_path}", "run.name=g", "teacher.source=cache",
        f"teacher.cache={fp32_cache}")]
    train.main(argv + ["--student", "method.name=kd", "--student", "method.name=ce"])
    assert len(reads) == 2 * 3  # one read per batch for the three students: 2 epochs of 3 batches
    train.main(argv + ["method.name=kd", "run.name=kd_alone"])
    a = torch.load(tmp_path / "g" / "student1" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "kd_alone" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, field", [("run.seed=1", "'seed'"), ("data.subset=64", "'num_samples'"),
                                          ("pipeline.randaug_n=1", "'randaug_n'"),
                                          ("teacher.name=resnet14", "'teacher'")])
def test_fingerprint_mismatch_names_the_field(demo_root, teacher_ckpt, fp32_cache, tmp_path, extra, field):
    with pytest.raises(CacheError, match=field):
        step_losses(demo_root, teacher_ckpt, tmp_path, "teacher.source=cache", f"teacher.cache={fp32_cache}", extra)


def test_training_from_a_cache_whose_teacher_checkpoint_is_not_here(demo_root, teacher_ckpt, fp32_cache, tmp_path,
                                                                    caplog):
    """A cache copied to another machine: its teacher's file is absent there; one log line, the cache's fingerprint
    is trusted, the losses are the ones a run with the file present computes."""
    run = ("teacher.source=cache", f"teacher.cache={fp32_cache}", "optim.epochs=1")
    here, _ = step_losses(demo_root, teacher_ckpt, tmp_path / "a", *run)
    with caplog.at_level("INFO", logger="training.loop"):
        away, _ = step_losses(demo_root, str(tmp_path / "elsewhere" / "ckpt_epoch_240.pth"), tmp_path / "b", *run)
    assert away == here
    assert len(here) == 3 and sum("is not on this machine" in r.getMessage() for r in caplog.records) == 1


def test_other_teacher_checkpoint_is_refused(demo_root, fp32_cache, tmp_path, random_teacher):
    with pytest.raises(CacheError, match="teacher_sha256"):
        step_losses(demo_root, random_teacher(seed=5), tmp_path, "teacher.source=cache", f"teacher.cache={fp32_cache}")


def test_missing_truncated_and_unfinished_caches(demo_root, teacher_ckpt, fp32_cache, tmp_path):
    run = ("teacher.source=cache",)
    with pytest.raises(CacheError, match="does not exist"):
        step_losses(demo_root, teacher_ckpt, tmp_path, *run, f"teacher.cache={tmp_path / 'nope'}")
    broken = tmp_path / "broken"
    shutil.copytree(fp32_cache, broken)
    f = broken / "epoch_0001" / "logits.npy"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CacheError, match=r"epoch_0001/logits.npy: missing, truncated"):
        step_losses(demo_root, teacher_ckpt, tmp_path, *run, f"teacher.cache={broken}")
    os.remove(broken / "meta.json")  # a build killed before its first epoch completed
    with pytest.raises(CacheError, match="has no meta.json"):
        step_losses(demo_root, teacher_ckpt, tmp_path, *run, f"teacher.cache={broken}")


def test_short_cache_errors_or_cycles_with_its_views(demo_root, teacher_ckpt, fp32_cache, tmp_path):
    run = ("teacher.source=cache", f"teacher.cache={fp32_cache}", "optim.epochs=3")
    with pytest.raises(CacheError, match="holds 2 augmentation epochs but the run needs 3"):
        step_losses(demo_root, teacher_ckpt, tmp_path, *run)
    cfg = load_config(os.path.join(ROOT, "configs/demo/crld.yaml"),
                      overrides(demo_root, teacher_ckpt, *run, "teacher.cache_cycle=true", f"run.out_dir={tmp_path}"))
    tl, vl, src = build_loaders(cfg, torch.device("cpu"))
    tr = Trainer(cfg, torch.device("cpu"), str(tmp_path), tl, vl, train_source=src)
    assert [tr.cache.view_epoch(e) for e in range(5)] == [0, 1, 0, 1, 0]
    # Through the real epoch loop: at every step of epochs 0, 1 and the replayed 2, the cached logits are
    # the teacher's logits on exactly the views the loader yielded.
    from training.loop import frozen_teacher
    teacher, real_step, checked = frozen_teacher(cfg, torch.device("cpu")), tr.train_step, []

    def checking_step(batch, cached, students):
        with torch.no_grad():
            want = teacher(torch.cat([batch.weak, batch.strong])).chunk(2)
        for got, w in zip(cached, want):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
        checked.append(students[0].epoch)
        return real_step(batch, cached, students)
    tr.train_step = checking_step
    for epoch in range(3):
        tr.students[0].epoch = epoch
        tr.train_epoch(epoch, tr.students)
    assert checked == [0] * 3 + [1] * 3 + [2] * 3


def test_teacher_precision_and_view_source_are_fingerprinted(demo_root, teacher_ckpt, fp32_cache, tmp_path):
    with pytest.raises(CacheError, match="'teacher_amp' is 'off' in the cache but 'bfloat16'"):
        step_losses(demo_root, teacher_ckpt, tmp_path, "teacher.source=cache", f"teacher.cache={fp32_cache}",
                    "run.amp=bf16")
    from training.teacher_cache import view_source
    (tmp_path / "ffcv").mkdir()
    side = {"settings": {"max_resolution": 256}, "num_samples": 96, "beton_bytes": 1}
    (tmp_path / "ffcv" / "train.beton.json").write_text(json.dumps(side))
    cfg = load_config(None, ["pipeline.name=ffcv", f"pipeline.ffcv_dir={tmp_path / 'ffcv'}"])
    a = view_source(cfg)
    side["settings"]["max_resolution"] = 512
    (tmp_path / "ffcv" / "train.beton.json").write_text(json.dumps(side))
    assert a.startswith("ffcv:") and view_source(cfg) != a != view_source(load_config(None, ["pipeline.name=dali"]))
    assert view_source(load_config(None, ["pipeline.name=dali"])) == view_source(load_config(None, []))
    # the routes cut the same pixels except FFCV's resized crops, which its compiled resize cuts on the
    # accelerator route: a cache built by one is refused by the other exactly there
    for crop, differ in (("pad", False), ("rrc", True)):
        host, dev = (load_config(None, ["pipeline.name=ffcv", f"pipeline.ffcv_dir={tmp_path / 'ffcv'}",
                                        f"data.train_crop={crop}", f"pipeline.route={r}"]) for r in ("host", "device"))
        assert (view_source(host) != view_source(dev)) == differ
    for name in ("torch", "dali", "gpu"):
        assert view_source(load_config(None, [f"pipeline.name={name}", "pipeline.route=device"])) == "source images"


def test_killed_first_epoch_is_rebuilt_and_concurrent_builds_are_refused(demo_root, teacher_ckpt, tmp_path):
    d = tmp_path / "c"
    build(d, demo_root, teacher_ckpt, epochs=1, precision="fp16")
    os.remove(d / "meta.json")  # killed after the first epoch's rename, before meta.json
    meta = build(d, demo_root, teacher_ckpt, epochs=1, precision="fp16")
    assert meta["epochs"] == 1 and (d / "meta.json").exists()
    (d / ".lock").write_text(str(os.getpid()))  # a live builder holds the lock
    with pytest.raises(CacheError, match="another cache_teacher.py"):
        build(d, demo_root, teacher_ckpt, epochs=2, precision="fp16")
    (d / ".lock").write_text("999999999")  # a dead one: taken over
    assert build(d, demo_root, teacher_ckpt, epochs=2, precision="fp16")["epochs"] == 2
    assert not (d / ".lock").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(CacheError, match="not a teacher cache"):
        build(tmp_path / "other", demo_root, teacher_ckpt, epochs=1)


def test_extend_is_incremental_and_rerun_is_a_no_op(demo_root, teacher_ckpt, tmp_path):
    d = tmp_path / "c"
    build(d, demo_root, teacher_ckpt, epochs=1, precision="fp16")
    first = (d / "epoch_0000" / "logits.npy").read_bytes()
    meta = build(d, demo_root, teacher_ckpt, epochs=2, precision="fp16")
    assert meta["epochs"] == 2 and (d / "epoch_0000" / "logits.npy").read_bytes() == first
    assert [b["epochs"] for b in meta["builds"]] == [[0, 1], [1, 2]]
    mtime = (d / "meta.json").stat().st_mtime_ns
    build(d, demo_root, teacher_ckpt, epochs=2, precision="fp16")
    assert (d / "meta.json").stat().st_mtime_ns == mtime
    with pytest.raises(CacheError, match="'precision'"):  # extending with other settings
        build(d, demo_root, teacher_ckpt, epochs=3, precision="bf16")


def test_disk_full_leaves_no_temp_files(demo_root, teacher_ckpt, tmp_path, monkeypatch):
    from training.teacher_cache import RowWriter
    d = tmp_path / "c"
    build(d, demo_root, teacher_ckpt, epochs=1)

    def full(self, index, logits):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(RowWriter, "write", full)
    with pytest.raises(CacheError, match="no space left on its file system.*complete epochs and units kept"):
        build(d, demo_root, teacher_ckpt, epochs=2)
    # the build's record (.build.json) stays for the next run; no temp file, no partial unit
    assert sorted(os.listdir(d)) == [".build.json", ".units", "epoch_0000", "meta.json"]
    assert os.listdir(d / ".units") == []
    assert json.load(open(d / "meta.json"))["epochs"] == 1
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 1 << 40, 1 << 20))
    with pytest.raises(CacheError, match="not enough disk space"):
        build(d, demo_root, teacher_ckpt, epochs=2)


def test_bf16_store_round_trips(demo_root, teacher_ckpt, fp32_cache, tmp_path):
    from training.teacher_cache import from_storage
    d = tmp_path / "bf16"
    build(d, demo_root, teacher_ckpt, precision="bf16", epochs=1)
    got = from_storage(np.load(d / "epoch_0000" / "logits.npy"), "bf16").float()
    want = torch.from_numpy(np.load(fp32_cache / "epoch_0000" / "logits.npy"))
    torch.testing.assert_close(got, want.to(torch.bfloat16).float())


# ---- top-k ---------------------------------------------------------------------------------------
def peaked_logits(n=512, c=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2.0
    z[torch.arange(n), torch.randint(0, c, (n,), generator=g)] += 8.0  # a confident teacher
    return z


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_topk_keeps_top_probabilities_and_tail_mass_exactly(T):
    z = peaked_logits()
    v, k, f = compress_topk(z, 10, T)
    r = rebuild_topk(v, k, f, z.shape[1])
    p, q = F.softmax(z / T, 1), F.softmax(r / T, 1)
    torch.testing.assert_close(q.gather(1, k), p.gather(1, k), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(1 - q.gather(1, k).sum(1), 1 - p.gather(1, k).sum(1), rtol=1e-4, atol=1e-6)
    exact = rebuild_topk(*compress_topk(z, z.shape[1] - 1, T), z.shape[1])
    torch.testing.assert_close(F.softmax(exact / T, 1), p, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("T, bounds", [(1.0, (0.012, 0.003, 0.0005)), (4.0, (0.12, 0.08, 0.025))])
def test_topk_error_bounds_in_the_crld_loss(T, bounds):
    """KL to the full distribution and the CRLD loss error shrink with k, under bounds measured on a
    confident synthetic teacher and a random student (the worst case: an untrained student weighs
    the teacher's flattened tail most); exact at k = C - 1. Real-teacher figures: docs/benchmarks.md."""
    z_w, z_s = peaked_logits(seed=1), peaked_logits(seed=2)
    g = torch.Generator().manual_seed(0)
    s_w, s_s = torch.randn(512, 100, generator=g) * 2, torch.randn(512, 100, generator=g) * 2
    y = z_w.argmax(1)
    kw = dict(temperature=T, ce_weight=1.0, wv_weight=2.0, cv_weight=0.5, tau_w=0.9, tau_s=0.2)
    full = crld_loss(s_w, s_s, z_w, z_s, y, **kw)["loss"]
    kls, errs = [], []
    for k in (5, 20, 50, 99):
        r_w = rebuild_topk(*compress_topk(z_w, k, T), 100)
        r_s = rebuild_topk(*compress_topk(z_s, k, T), 100)
        kls.append(F.kl_div(F.log_softmax(r_w / T, 1), F.log_softmax(z_w / T, 1), log_target=True,
                            reduction="batchmean").item())
        errs.append(abs(crld_loss(s_w, s_s, r_w, r_s, y, **kw)["loss"] - full).item() / full.item())
    assert kls[0] > kls[1] > kls[2] > kls[3] and kls[3] < 1e-6, kls
    assert errs[0] > errs[1] > errs[2] and errs[3] < 1e-6, errs
    assert all(e < b for e, b in zip(errs, bounds)), errs


def test_topk_cache_trains_and_is_smaller(demo_root, teacher_ckpt, tmp_path):
    d = tmp_path / "top3"
    meta = build(d, demo_root, teacher_ckpt, epochs=2, topk=3, precision="fp16")
    assert meta["fingerprint"]["topk"] == 3 and meta["fingerprint"]["temperature"] == 4.0
    assert np.load(d / "epoch_0000" / "classes.npy").dtype == np.int16
    losses, _ = step_losses(demo_root, teacher_ckpt, tmp_path / "r", "teacher.source=cache", f"teacher.cache={d}")
    assert all(np.isfinite(x["loss"]) for x in losses)
    with pytest.raises(CacheError, match="'temperature'"):  # the fill values were made for T=4
        step_losses(demo_root, teacher_ckpt, tmp_path / "r2", "teacher.source=cache", f"teacher.cache={d}",
                    "method.temperature=2")
    for over in ("method.name=nkd", "method.name=mlkd", "method.base=normkd"):  # other temperatures, row spreads
        with pytest.raises(RuntimeConfigError, match="top-3 cache cannot serve"):
            step_losses(demo_root, teacher_ckpt, tmp_path / "r3", "teacher.source=cache", f"teacher.cache={d}", over)


def test_topk_error_script_on_a_full_cache(fp32_cache, tmp_path, script_module):
    mod = script_module("topk_error")
    rows = mod.main(["--cache", str(fp32_cache), "--k", "1,5,9", "--temperature", "1",
                     "--json", str(tmp_path / "e.json")])
    kl = [r["kl_mean"] for r in rows]
    assert kl[0] > kl[1] > kl[2] and kl[2] < 1e-6
    assert all(r["confidence_abs_err_max"] < 1e-5 for r in rows)  # at T=1 the tail mass, hence max prob, is exact
    with pytest.raises(CacheError, match="must be in"):
        mod.main(["--cache", str(fp32_cache), "--k", "10"])


def test_folder_digest_sees_names_and_sizes_of_the_files(tmp_path):
    from datasets_prep.make_jpeg_folder import make_jpeg_folder
    from pipelines.sources import FolderSource
    from training.teacher_cache import dataset_digest
    root = make_jpeg_folder(str(tmp_path / "j"), train=6, val=2, classes=2, size=(40, 30))
    src = FolderSource(os.path.join(root, "train"))
    first = dataset_digest(src)
    assert dataset_digest(FolderSource(os.path.join(root, "train"))) == first
    # the same tree resized under the same file names: other image sizes, other crop boxes
    from PIL import Image
    f = src.files[0]
    Image.open(f).resize((20, 15)).save(f, quality=90)
    assert dataset_digest(FolderSource(os.path.join(root, "train"))) != first
