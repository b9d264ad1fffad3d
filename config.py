"""Every default of the project, one commented line each.

Scripts read these as their argparse defaults, so `python train.py --help` shows
them and any of them can be overridden on the command line. Change a default
here, not in the scripts.
"""
import os

# --- pre_process.py: IMDB-WIKI metadata -> aligned faces -------------------------------
ROOT = "data/imdb_crop"  # the unpacked faces-only archive: holds imdb.mat (or wiki.mat) and 00..99/
SIZE = 112  # side of the aligned face in pixels (112 or 224; the ArcFace template scales with it)
DATA_FOR_SIZE = "data/{dataset}_{size}"  # pre_process.py's default --out: a folder per dataset and --size, never mixed
DATA = DATA_FOR_SIZE.format(dataset="imdb", size=SIZE)  # train.py and evaluate.py read from here: IMDB's faces at SIZE
PER_AGE = 5000  # at most this many images per age, a seeded random choice (the original: 5000)
MIN_FACE_SCORE = 1.0  # drop entries whose IMDB-WIKI face_score is below this (-inf: no face)
MIN_AGE, MAX_AGE = 0, 100  # keep ages in this closed range; also the age classes of ce/dex/mv
VALID_FRACTION = 0.1  # share of identities (or images, with --split image) held out for validation
SPLIT = "identity"  # identity: nobody on both sides; image: random per photo, as the original did
FALLBACK = "drop"  # when MTCNN finds no face: drop the entry, or align the centre the 40% margin implies
JPEG_QUALITY = 95  # aligned faces are stored as JPEG at this quality
WORKERS = 2  # decoding / writing processes (these machines have 2 cores; raise on a big box)
WORKERS_CUDA = 8  # pre_process.py's on a GPU, at most: the H200 figures ran with 8 on 16 cores; within each local process's share of the cores, less the one feeding the GPU, but never below WORKERS
DETECT_BATCH = 16  # photos per batched MTCNN call (pre_process.py on the CPU; demo.py and serve.py: per batch of photos)
DETECT_BATCH_CUDA = 64  # pre_process.py's on a GPU, where each op is a launch or a dispatch: a call runs ~2,080 ops of its own besides ~28 per photo (counted on the CPU)
MIN_FACE_FRACTION = 0.25  # pre_process.py looks for faces from this share of a crop's short side up (the labelled one spans ~0.56); none found: retried from 20 px
HOST_PYRAMIDS = True  # pre_process.py on a GPU: the --workers threads make P-Net's pyramids, 1 copy a pass, not ~82 ops a photo; they also contend for the GIL (scripts/gil_cost.py): untimed on a GPU
PREPARE_IN = "threads"  # pre_process.py: where photos are shrunk (and on a GPU pyramids made) ahead of MTCNN: "threads" (on a GPU beside the feeding thread, sharing its GIL: 1.57x its ops' time in scripts/gil_cost.py; on the CPU inline) or "processes" (the decoding workers: 0.88x there; on 2 CPU cores 0.68-0.88x the photos/s of inline, twice the memory); untimed on a GPU
SORT_BATCHES = 4  # pre_process.py sorts decoded photos by size this many --batch's at a time (similar sizes share P-Net's tiles)

# --- models.py ---------------------------------------------------------------------------
ARCH = "resnet18"  # resnet18 | resnet34 | resnet50
PRETRAINED = "imagenet"  # imagenet (torchvision download) | none | PATH to a local state dict
AGE_MEAN, AGE_STD = 35.0, 15.0  # l1/l2 heads predict (age - AGE_MEAN) / AGE_STD: unit-scale targets keep l2 stable at large lr
AGE_INTERVAL = 0.8  # ce/dex/mv: age_low..age_high holds this share of the predicted age distribution (10th to 90th percentile)
MV_LAMBDAS = (0.2, 0.05)  # mean-variance loss weights of the mean and variance terms (Pan et al., CVPR 2018)

# --- train.py ----------------------------------------------------------------------------
OUT = "runs/r18_112"  # run directory: config.json, metrics.jsonl, last.pt, best.pt, TensorBoard
AGE_LOSS = "l1"  # l1 | l2 | ce | dex | mv (see models.py for each head and prediction rule)
AGE_WEIGHT = 0.1  # total loss = gender CE + AGE_WEIGHT * age loss: l1 in years, ce/dex in nats (the original: 0.1)
AGE_WEIGHT_L2 = 0.01  # --age-loss l2's default weight instead: its loss is in years^2 (the original: 0.01; 0.1 diverges at a GPU batch's lr)
BATCH_SIZE_CUDA = 256  # per process on a GPU: a fraction of a big card's memory (ResNet-50 at 224: ~11 GiB); lr scales with it
BATCH_SIZE_CPU = 32  # per process on the CPU, and the original's batch
EPOCHS = 30  # passes over the training split
LR = 0.01  # peak learning rate at a global batch of LR_BATCH; scaled linearly with the global batch
LR_BATCH = 32  # lr = LR * (batch size * processes) / LR_BATCH
MOMENTUM = 0.9  # SGD momentum
WEIGHT_DECAY = 5e-4  # L2 on weights (not on norms and biases)
WARMUP_EPOCHS = 1  # linear warm-up before the cosine decay
NUM_WORKERS = 2  # DataLoader worker processes
SEED = 42  # seeds the split, the cap, the init and the data order
DUMMY_FACES, DUMMY_VALID = 4096, 512  # train.py --dummy: random training and validation faces held in memory (224 px: 690 MB)
DEVICE = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N
AMP = True  # bf16 autocast on CUDA, and on the CPU where AMP_CPU allows
AMP_CPU = None  # bf16 on the CPU too; None = only where it has bf16 instructions (AVX512-BF16, AMX): elsewhere
               # oneDNN emulates bf16, ~15x slower than fp32 (ResNet-18 training on a 2-core AVX2 EPYC)
COMPILE = False  # torch.compile the model (slow to start; pays off on long GPU runs)
COMPILE_MODE = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
CUDA_GRAPH = False  # capture the whole step as one CUDA graph (one GPU, no --compile): launches cost nothing; off until measured on a GPU
PREFETCH = 2  # packed loader: batches gathered, copied and augmented in a background thread ahead of the step
CHANNELS_LAST = True  # NHWC memory format for the model and its inputs (faster convolutions on GPUs and recent CPUs)
PROFILE = 0  # train.py --profile N: torch.profiler records N training steps of the first epoch into OUT/profile.*; 0: off
PROFILE_SKIP = 10  # steps run before --profile records: cuDNN's autotuning, --cuda-graph's 3 warm-up steps and capture
LOG_EVERY = 20  # steps between progress-bar updates and non-finite-loss checks (each costs one host sync)
BEST_GENDER_WEIGHT = 10.0  # best.pt minimises age_mae + this * (1 - gender_acc): 1 point of accuracy = 0.1 year

# --- demo.py / evaluate.py / export.py ---------------------------------------------------
CHECKPOINT = "runs/r18_112/best.pt"  # what demo.py, evaluate.py and export.py load
IMAGES = "images"  # the sample photos demo.py annotates by default
DEMO_OUT = "out/demo"  # annotated photos and results.json
EVAL_OUT = "out/eval"  # metrics.json and plots
MIN_GROUP = 30  # evaluate.py flags a gender x age-bucket group with fewer faces as too few to trust
EVAL_BATCH = 128  # faces per evaluate.py forward pass (and at most this many raw photos per MTCNN call, with --utkface/--csv)
DETECT_PIXELS = 48_000_000  # evaluate.py --utkface/--csv, demo.py, serve.py: photo pixels per MTCNN call, whatever the batch; ~4 12-MP photos, ~1.3 GB on a CPU
DEMO_MIN_SCORE = 0.9  # demo.py ignores MTCNN detections scoring below this (false positives)
DEMO_MIN_FACE = 40  # smallest face demo.py looks for, px: smaller ones are blur at 112 px; halving it ~4x MTCNN's work
SHEET_ROWS = 10  # photos in demo.py --sheet's table (the original README showed 10)
ONNX_OPSET = 18  # export.py's ONNX opset (onnxruntime 1.17+ runs it)
ONNX_TOLERANCE = 1e-3  # export.py fails if onnxruntime and PyTorch differ by more (probabilities and years)
MTCNN_ONNX_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "age_gender", "mtcnn_onnx")  # MTCNN's nets exported to ONNX once (for .onnx models), reused by every later run

# --- serve.py --------------------------------------------------------------------------------
SERVE_HOST = "127.0.0.1"  # the interface serve.py listens on (0.0.0.0: every interface; put a proxy with TLS in front)
SERVE_PORT = 8000  # its TCP port
SERVE_MAX_BYTES = 20_000_000  # largest upload accepted (a 48-MP JPEG is ~15 MB); larger ones get 413
SERVE_WAIT_MS = 5.0  # how long the first photo of a batch waits for others to arrive (micro-batching)
SERVE_MAX_QUEUE = 64  # most decoded photos waiting for the model (4 batches; each up to DETECT_PIXELS: 48 MP is 144 MB); more get 503
