"""The data route on the device: the `gpu` backend's views, the side-stream prefetcher, and DALI's GPU decode
(nvJPEG) against the `torch` reference that the teacher cache's fingerprint treats as the same view source."""
import os

import pytest
import torch

from datasets_prep.make_cifar_like import make_cifar_like
from datasets_prep.make_jpeg_folder import make_jpeg_folder
from pipelines import available_pipelines, build_loaders
from training.config import load_config

CPU = torch.device("cpu")


def grey_levels(x, mean_std):
    """Normalised views back to the uint8 grey levels they came from: the normaliser's multiply-add is fused on
    CUDA and not on the CPU, so the float views may differ in the last bit while the pixels are equal."""
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in mean_std)
    return (x.double().cpu() * std * 255 + mean * 255).round().to(torch.int16)


def cifar_like(work, small):
    return make_cifar_like(os.path.join(work, "cifar_like"), train=512 if small else 4096, test=64)


def gpu_route(root, dev):
    cfg = load_config(None, ["data.dataset=cifar100", f"data.root={root}", "pipeline.name=gpu", "run.amp=off",
                             "pipeline.batch_size=128", "pipeline.route=device", f"run.device={dev}"])
    return build_loaders(cfg, torch.device(dev))


def take_batches(train, n, epoch=1):
    train.set_epoch(epoch)
    it = iter(train)
    return [next(it) for _ in range(n)]


def gpu_route_diff(ref, got, mean_std):
    """Two runs' batches compared: indices equal, the views' largest difference in grey levels."""
    def worst(view):
        return max(int((grey_levels(getattr(a, view), mean_std) - grey_levels(getattr(b, view), mean_std)).abs().max())
                   for a, b in zip(ref, got))
    return {"index_equal": all(torch.equal(a.index, b.index.cpu()) for a, b in zip(ref, got)),
            "weak": worst("weak"), "strong": worst("strong"),
            "weak_bit_exact": all(torch.equal(a.weak, b.weak.cpu()) for a, b in zip(ref, got))}


@pytest.mark.cuda
def test_gpu_route_on_device_matches_cpu(device, small, work, record_property):
    """`--pipeline gpu` (through the prefetcher on CUDA) against the same route on the CPU, two batches of epoch
    1: the same samples, weak views' grey levels equal, strong views within the augmenter's 1 grey level."""
    root = cifar_like(work, small)
    ref_train, _, src = gpu_route(root, "cpu")
    got_train, _, _ = gpu_route(root, str(device))
    d = gpu_route_diff(take_batches(ref_train, 2), take_batches(got_train, 2), src.mean_std)
    record_property("summary", f"weak max {d['weak']} grey levels (bit-exact {d['weak_bit_exact']}), "
                               f"strong max {d['strong']}")
    assert d["index_equal"] and d["weak"] == 0 and d["strong"] <= 1, d


def test_gpu_route_comparison_takes_a_last_bit_but_not_a_grey_level(work):
    """A weak view one float ulp off (a fused multiply-add) passes; one pixel a grey level off fails."""
    train, _, src = gpu_route(cifar_like(work, True), "cpu")
    ref = take_batches(train, 2)
    std = src.mean_std[1][0]
    ulp = [b._replace(weak=torch.nextafter(b.weak, torch.full_like(b.weak, 10.0))) for b in ref]
    d = gpu_route_diff(ref, ulp, src.mean_std)
    assert d["weak"] == 0 and not d["weak_bit_exact"], d
    level = [b._replace(weak=b.weak.clone()) for b in ref]
    level[1].weak[0, 0, 3, 5] += 1.0 / (255 * std)
    assert gpu_route_diff(ref, level, src.mean_std)["weak"] == 1


def prefetched_epoch(train, device):
    """Every batch of epoch 2 through `train` (the prefetcher) and through the loader it wraps. On CUDA the
    step's stream is kept busy (~10 ms) after each hand-over, so a missing stream wait or a buffer reused too
    early shows as a differing batch; on a CPU the wrapper passes batches through."""
    out = {}
    for name, loader in (("plain", getattr(train, "loader", train)), ("prefetched", train)):
        loader.set_epoch(2)
        out[name] = []
        for b in loader:
            if device.type == "cuda":
                torch.cuda._sleep(20_000_000)
            out[name].append([t.clone() for t in b[:4]])
            if name == "plain" and device.type == "cuda":
                torch.cuda.synchronize()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out["plain"], out["prefetched"]


def same_batches(a, b):
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


@pytest.mark.cuda
def test_prefetcher_hands_over_every_batch_intact(device, small, work, record_property):
    train, _, _ = gpu_route(cifar_like(work, small), str(device))
    plain, prefetched = prefetched_epoch(train, device)
    record_property("summary", f"{len(prefetched)} batches through {type(train).__name__}")
    assert same_batches(plain, prefetched)


def test_prefetcher_comparison_catches_one_changed_batch(work):
    train, _, _ = gpu_route(cifar_like(work, True), "cpu")
    plain, prefetched = prefetched_epoch(train, CPU)
    assert same_batches(plain, prefetched)
    prefetched[1][1] = prefetched[1][1] + 1
    assert not same_batches(plain, prefetched)


def dali_against_torch(device, small, work):
    """`dali` on `device` (on CUDA: nvJPEG decode, GPU resize) and `torch` on the CPU (PIL decode) over the same
    JPEGs: two batches of epoch 1 and one validation batch each, and the normaliser's mean / std."""
    size, resize, shape = (48, 56, (96, 72)) if small else (224, 256, (500, 375))
    root = make_jpeg_folder(os.path.join(work, f"jpeg_decode_{size}"), train=64, val=16, classes=4, size=shape)
    runs = []
    for pipe, dev in (("torch", "cpu"), ("dali", str(device))):
        cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={root}", "data.num_classes=4",
                                 f"data.image_size={size}", "data.train_crop=rrc", f"data.val_resize={resize}",
                                 "pipeline.batch_size=16", "pipeline.val_batch_size=16", "pipeline.num_workers=0",
                                 f"pipeline.name={pipe}", "pipeline.route=device", "run.amp=off", f"run.device={dev}"])
        train, val, src = build_loaders(cfg, torch.device(dev))
        runs.append((take_batches(train, 2), next(iter(val)), src.mean_std))
    return runs


def decode_diff(ref, got, mean_std):
    """Mean and max absolute difference in grey levels per view kind (weak, strong: the worse batch)."""
    def diff(a, b):
        d = (grey_levels(a, mean_std) - grey_levels(b, mean_std)).abs().float()
        return float(d.mean()), int(d.max())
    (ref_train, ref_val), (got_train, got_val) = ref, got
    return {"index_equal": all(torch.equal(a.index.cpu(), b.index.cpu()) for a, b in zip(ref_train, got_train)),
            "weak": max(diff(a.weak, b.weak) for a, b in zip(ref_train, got_train)),
            "strong": max(diff(a.strong, b.strong) for a, b in zip(ref_train, got_train)),
            "val": diff(ref_val.image, got_val.image)}


def within_dali_tolerance(d):
    """The CPU tests' tolerance (tests/test_dali.py): mean weak < 1, strong < 2, validation < 1 grey level;
    beyond it, the decoder belongs in the cache's fingerprint."""
    return d["index_equal"] and d["weak"][0] < 1.0 and d["strong"][0] < 2.0 and d["val"][0] < 1.0


@pytest.mark.cuda
@pytest.mark.dali
@pytest.mark.skipif("dali" not in available_pipelines(), reason="needs nvidia.dali")
def test_dali_decode_on_device_matches_the_torch_reference(device, small, work, record_property):
    (ref, ref_val, mean_std), (got, got_val, _) = dali_against_torch(device, small, work)
    d = decode_diff((ref, ref_val), (got, got_val), mean_std)
    record_property("summary", "grey levels mean / max: " + ", ".join(
        f"{k} {d[k][0]:.2f} / {d[k][1]}" for k in ("weak", "strong", "val")))
    assert within_dali_tolerance(d), d


@pytest.mark.skipif("dali" not in available_pipelines(), reason="needs nvidia.dali")
def test_dali_comparison_catches_a_shifted_view(work):
    (ref, ref_val, mean_std), _ = dali_against_torch(CPU, True, work)
    assert within_dali_tolerance(decode_diff((ref, ref_val), (ref, ref_val), mean_std))
    brighter = [b._replace(strong=b.strong + 2.5 / (255 * mean_std[1][0])) for b in ref]
    assert not within_dali_tolerance(decode_diff((ref, ref_val), (brighter, ref_val), mean_std))
