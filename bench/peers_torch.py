# Vendored from shared/bench/peers_torch.py: the PyTorch peer benchmark another engineer wrote
# for diffdyn's comparisons (see bench/README.md there). It is copied so that a GPU machine that
# receives only this repository can run it; it is not diffdyn code. Changed here, for
# bench/run.py's one budgeted command: the quick mode (PEER_QUICK, PEER_PARTS), the JSON
# rewritten after every figure, and exit status 3 without a CUDA device. Without PEER_QUICK it
# measures what the shared file measures.
"""Peer anchors on a GPU: what a user would pick instead of diffdyn, in PyTorch.

Measures, on one machine in one run:
  * diffusers UNet2DModel shaped like unet_cifar32 (base 32 and 64): train step/s
    at batch 4 (AMP fp16 + GradScaler + Adam + EMA, as the seed harness ran) and
    images/s at batch 128; eager, and torch.compile where it finishes in time.
  * PyHessian-style Hutchinson trace (double backward, loop over 16 Rademacher
    probes) on a fixed batch of 4: seconds per measurement, ratio to a train step.
  * pytorch-fid InceptionV3 (FID variant, random weights: throughput only)
    pool3 features from 32x32 inputs resized to 299: images/s.
  * DDPM ancestral sampling, 50 steps (diffusers DDPMScheduler): images/s.
Prints one JSON line per figure and a table last.

PEER_QUICK=1 keeps the strongest variant of each figure and drops the rest: base 32 only,
train at batch 4 eager (the 20x target's reference) and torch.compile reduce-overhead (faster
than "default"), fewer timed repeats. By the H100 figures in shared/bench/README.md that is
about 135 s (an estimate, not a measurement: 90 s of it is reduce-overhead's compile). There
PEER_PARTS (comma-separated train,hutch,inception,sampling; default all) picks the figures;
`hutch` without `train` measures a fresh network and emits no ratio to a train step
(bench/run.py derives it from the two figures).
"""
import json, os, sys, time

import torch

RESULTS = []
QUICK = os.environ.get("PEER_QUICK", "") not in ("", "0")
PEER_PARTS = ("train", "hutch", "inception", "sampling")
NO_CUDA_EXIT = 3


def emit(name, value, unit, **kw):
    row = {"name": name, "value": value, "unit": unit, **kw}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)
    write_results()


def write_results():
    """$OUT/peers_torch.json, replaced whole, so a run stopped early keeps every figure so far."""
    out = os.environ.get("OUT")
    if out:
        path = os.path.join(out, "peers_torch.json")
        with open(path + ".tmp", "w") as f:
            json.dump(RESULTS, f, indent=1)
        os.replace(path + ".tmp", path)


def timeit(fn, n, warm):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def make_unet(bc):
    from diffusers import UNet2DModel
    kw = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
              block_out_channels=(bc, 2 * bc, 2 * bc, 2 * bc),
              down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
              norm_num_groups=8)
    try:
        return UNet2DModel(dropout=0.1, **kw)
    except TypeError:
        return UNet2DModel(**kw)


def schedule(dev):
    betas = torch.linspace(1e-4, 0.02, 1000, device=dev)
    ac = torch.cumprod(1 - betas, 0)
    snr = ac / (1 - ac)
    w_minsnr = torch.clamp(snr, max=5.0) / snr
    return ac, w_minsnr


def bench_train(bc, batch, compile_mode=None, n=200, warm=20):
    dev = "cuda"
    torch.manual_seed(1077)
    model = make_unet(bc).to(dev)
    nparams = sum(p.numel() for p in model.parameters())
    fwd = torch.compile(model, mode=compile_mode) if compile_mode else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    ema = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    ac, w = schedule(dev)
    x0 = torch.rand(batch, 3, 32, 32, device=dev) * 2 - 1

    def step():
        t = torch.randint(0, 1000, (batch,), device=dev)
        noise = torch.randn_like(x0)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            eps = fwd(xt, t).sample
            loss = (w[t] * ((eps.float() - noise) ** 2).mean((1, 2, 3))).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - 0.999)

    t0 = time.perf_counter()
    step(); torch.cuda.synchronize()
    first = time.perf_counter() - t0
    sec = timeit(step, n, warm)
    tag = compile_mode or ("compile" if compile_mode == "" else "eager")
    emit(f"torch_train_bc{bc}_b{batch}_{tag}", 1.0 / sec, "steps/s", params=nparams,
         images_per_s=batch / sec, first_step_s=round(first, 2))
    return model, sec


def bench_hutch(model, bc, probes=16, batch=4, n=5):
    dev = "cuda"
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    ac, w = schedule(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.rand(batch, 3, 32, 32, device=dev, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (batch,), device=dev, generator=g)
    noise = torch.randn(x0.shape, device=dev, generator=g)
    a = ac[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise

    vals = []

    def trace():
        loss = (w[t] * ((model(xt, t).sample - noise) ** 2).mean((1, 2, 3))).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        vals.clear()
        for _ in range(probes):
            vs = [torch.randint_like(p, 2) * 2 - 1 for p in params]
            hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
            vals.append(sum((h * v).sum() for h, v in zip(hv, vs)).item())
        return vals

    from torch.nn.attention import sdpa_kernel, SDPBackend
    with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
        sec = timeit(trace, n, 1)
        if not QUICK:
            trace()
    emit(f"torch_hutch{probes}_bc{bc}_b{batch}", sec, "s/measurement",
         trace_mean=sum(vals) / len(vals))
    model.train()
    return sec


def bench_inception(batch=500):
    import pytorch_fid.inception as pi
    sd_holder = {}

    def fake_load(url, progress=True, **kw):  # offline: random weights, same shapes
        m = pi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        return m.state_dict()

    pi.load_state_dict_from_url = fake_load
    net = pi.InceptionV3([pi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).cuda().eval()
    x = torch.rand(batch, 3, 32, 32, device="cuda")

    @torch.no_grad()
    def run():
        return net(x)[0]

    sec = timeit(run, 10, 2)
    emit("torch_pytorchfid_inception_fp32", batch / sec, "images/s", batch=batch)


def bench_sampling(bc, batch=1000, nfe=50):
    from diffusers import DDPMScheduler
    model = make_unet(bc).cuda().eval()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    sched.set_timesteps(nfe)

    @torch.no_grad()
    def run():
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            for t in sched.timesteps:
                eps = model(x, t.to("cuda").expand(batch)).sample
                x = sched.step(eps.float(), t, x).prev_sample
        return x

    sec = timeit(run, 2, 1)
    emit(f"torch_ddpm{nfe}_sample_bc{bc}_b{batch}_fp16", batch / sec, "images/s")


def quick(parts):
    """The strongest variant of each figure, base 32 only (see the module docstring)."""
    step_s = None
    if "train" in parts:
        _, step_s = bench_train(32, 4, n=100, warm=10)
        try:
            bench_train(32, 4, compile_mode="reduce-overhead", n=200)
        except Exception as e:
            emit("torch_compile_ro_failed", 0, "", error=repr(e)[:200])
    if "hutch" in parts:
        h = bench_hutch(make_unet(32).to("cuda"), 32, n=3)
        if step_s is not None:
            emit("torch_hutch16_over_step_bc32", h / step_s, "x train step")
    if "inception" in parts:
        bench_inception()
    if "sampling" in parts:
        bench_sampling(32)


def main():
    if not torch.cuda.is_available():
        print("peer: no CUDA device; the peer runs only on a GPU", flush=True)
        sys.exit(NO_CUDA_EXIT)
    parts = [p for p in os.environ.get("PEER_PARTS", ",".join(PEER_PARTS)).split(",") if p]
    unknown = sorted(set(parts) - set(PEER_PARTS))
    if unknown:
        print(f"error: PEER_PARTS names {unknown}; choose from {','.join(PEER_PARTS)}")
        sys.exit(2)
    print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}), flush=True)
    if QUICK:
        quick(parts)
        print_table()
        return
    budget = float(os.environ.get("PEER_BUDGET_S", "420"))
    t_start = time.perf_counter()
    for bc in (32, 64):
        model, step_s = bench_train(bc, 4)
        h = bench_hutch(model, bc)
        emit(f"torch_hutch16_over_step_bc{bc}", h / step_s, "x train step")
        bench_train(bc, 128, n=50)
    bench_inception()
    bench_sampling(32)
    if time.perf_counter() - t_start < budget - 200:
        try:
            bench_train(32, 4, compile_mode="default", n=200)
        except Exception as e:  # compile may fail on this image; note it
            emit("torch_compile_failed", 0, "", error=repr(e)[:200])
    if time.perf_counter() - t_start < budget - 150:
        try:
            bench_train(32, 4, compile_mode="reduce-overhead", n=200)
        except Exception as e:
            emit("torch_compile_ro_failed", 0, "", error=repr(e)[:200])
    print_table()


def print_table():
    print("\n%-40s %14s  %s" % ("figure", "value", "unit"))
    for r in RESULTS:
        print("%-40s %14.3f  %s" % (r["name"], r["value"], r["unit"]))


if __name__ == "__main__":
    main()
