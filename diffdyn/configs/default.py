"""What the seed studies share: CIFAR-10, batch 4, Adam 1e-4, EMA 0.999, linear beta, eps-MSE.

Every experiment file starts from this config and overrides only what differs. It also
serves as the schema: `diffdyn.config.validate` rejects keys that are not defined here.

  python launch.py --config experiments/base.py --workdir runs/base
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "base"
  config.seed = 1077

  config.data = ml_collections.ConfigDict(dict(
      # "cifar10" (tensorflow-datasets, or the cifar-10-batches-py folder at path) | "npz" (uint8
      # under "images" or "x" in the file at path) | "folder" (PNG/JPEG files under path) |
      # "synthetic". A key set here that the source does not read is an error.
      name="cifar10",
      split="train",         # cifar10 only
      path="",
      layout="NHWC",         # npz only: "NHWC" | "NCHW" (transposed on loading)
      tfds_data_dir="",      # where tensorflow-datasets keeps (or downloads) CIFAR-10
      random_flip=True,
      image_size=32,
      synthetic_num_images=2048,
      synthetic_seed=0,
  ))

  config.diffusion = ml_collections.ConfigDict(dict(
      schedule="linear",     # "linear" | "cosine"
      num_timesteps=1000,
      beta_start=1e-4,
      beta_end=0.02,
      prediction="eps",      # "eps" | "v" | "x0"
  ))

  config.loss = ml_collections.ConfigDict(dict(
      weighting="constant",  # "constant" | "minsnr"
      minsnr_gamma=5.0,
  ))

  config.model = ml_collections.ConfigDict(dict(
      name="unet_cifar32",
      base_channels=32,
      channel_mult=(1, 2, 2, 2),
      num_res_blocks=2,
      attn_resolutions=(16,),
      dropout=0.1,
      image_size=32,
      channels=3,
  ))

  config.train = ml_collections.ConfigDict(dict(
      total_steps=10_000,
      batch_size=4,
      learning_rate=1e-4,
      warmup_steps=0,
      grad_clip_norm=0.0,    # 0 turns clipping off
      adam_b1=0.9,
      adam_b2=0.999,
      adam_eps=1e-8,
      ema_decay=0.999,
      precision="fp32",      # "fp32" | "bf16" (the seeds ran AMP)
      # EMA decay min(ema_decay, (1 + s) / (10 + s)) at update s; off, as in the seed harness,
      # the average keeps ema_decay**s of the random init (13.5% at 2k steps for 0.999).
      ema_warmup=False,
      # How a chunk of K steps runs: "scan" (one lax.scan, one dispatch: best on a GPU),
      # "loop" (K calls of the jitted step: XLA:CPU runs convolutions in a loop body slowly),
      # "auto" (loop on the CPU, scan elsewhere).
      chunk_runner="auto",
      log_every_steps=100,
      checkpoint_every_steps=1000,
      keep_checkpoints=3,
      skip_nonfinite_updates=False,
      # TensorBoard summaries and progress through CLU; importing it loads TensorFlow (seconds
      # per start). metrics.jsonl and the log are written either way.
      tensorboard=True,
  ))

  # The seeds' Hutchinson probe, on a fixed probe batch so that the curve moves only because
  # the parameters move (`batch="current"` measures on each step's train batch instead).
  config.curvature = ml_collections.ConfigDict(dict(
      enabled=False,
      every_steps=100,
      num_probes=16,
      estimator="hutchinson",  # "hutchinson" | "hutch++"
      batch="fixed",           # "fixed" | "current"
      batch_size=32,
      objective="train",       # "train" | "reference" | "both"
      # Which parameters are measured: "raw" (curvature/...), "ema" (curvature/ema/...) or both.
      # FID is of the EMA params, so curvature-FID pairs need "ema" or "both".
      params="raw",
      chunk_size=0,            # probes per vmapped chunk; 0 = as many as fit max_memory_gb
      # chunk_size=0's budget in GiB against XLA's plan: a T4 shows 15 GiB, JAX takes 75%
      # (11.25 GiB), and the train state and data stay resident beside the probe.
      max_memory_gb=10.0,
      t_bands=0,               # > 0: also the trace restricted to that many equal t-bands
      top_eig_every_steps=0,   # 0 = off; a multiple of every_steps
      top_eig_iters=20,
      blocks=False,            # per-block traces (UNet stage, kind), norms, normalised, tr/P
      ggn=False,               # Gauss-Newton trace on the same probes (one JVP each)
      precond_every_steps=0,   # Adam's lambda_max(P^-1 H); 0 = off; a multiple of every_steps
      precond_iters=20,
      density_every_steps=0,   # SLQ spectral density to curvature_density/; 0 = off; ditto
      density_runs=4,
      density_steps=30,
      density_points=512,
      density_broadening=0.01,  # Gaussian width as a fraction of the Ritz values' spread
  ))

  config.eval = ml_collections.ConfigDict(dict(
      fid_every_steps=2000,
      fid_num_samples=10_000,
      final_fid_num_samples=50_000,
      sampler="ddpm",
      nfe=50,
      eta=1.0,
      spacing="linspace",
      variance="small",
      clip_x0=True,
      respacing="respaced",
      sample_batch_size=500,
      grid_num_samples=64,
      grid_sampler="ddim",
      grid_nfe=20,
      grid_eta=0.0,
      grid_params="both",    # "ema" (samples/), "raw" (samples_raw/) or "both"
      grid_upscale=4,        # nearest-neighbour zoom of the saved grids, so 32x32 samples show
      fid_raw_params=False,  # also FID of the raw params at milestones (val/fid_milestone_raw)
  ))

  config.fid = ml_collections.ConfigDict(dict(
      enabled=True,
      inception_weights="",   # pt_inception-2015-12-05-6726825d.pth or its converted .npz
      reference_stats="",     # a precomputed mu/sigma .npz; empty: computed once and cached
      batch_size=500,
      cache_dir="",           # default: $DIFFDYN_CACHE or ~/.cache/diffdyn
  ))

  # Replicates trained together as one vmapped program (diffdyn/sweep.py): the grid of the seeds
  # and every non-empty variant tuple, each replicate with its own run directory.
  config.sweep = ml_collections.ConfigDict(dict(
      seeds=1,               # replicates per variant: seeds seed, seed + 1, ...
      seed_list=(),          # explicit seeds instead; then `seeds` is 1 or their number
      minsnr_gamma=(),       # variants of loss.minsnr_gamma, e.g. (1.0, 5.0)
      learning_rate=(),      # variants of train.learning_rate
      ema_decay=(),          # variants of train.ema_decay
      loss_weighting=(),     # variants of loss.weighting: ("constant", "minsnr") is E5 + E6
  ))
  return config
