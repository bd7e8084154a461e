#!/usr/bin/env bash
# The one prepared command for a machine with a GPU: offline set-up, the GPU benchmarks, one JSON.
#
#   OUT=/some/folder bash bench/device.sh          # on the GPU machine, from anywhere
#   REID_DEVICE_QUICK=1 OUT=/tmp/x bash bench/device.sh   # the same script on a CPU, in seconds
#
# What it does, installing nothing from the network:
#   1. finds a Python that imports torch; distributions missing from it are installed from the
#      wheels in .device-wheels/ (pip --no-index --no-deps into a private folder on PYTHONPATH,
#      or, without a usable pip, by unpacking the wheels there); the project itself is used from
#      the checkout (PYTHONPATH=repo) and its `reid` entry points are declared by a small
#      dist-info in that folder, so `python -m reid_cli serve` works without an editable install;
#   2. runs the benchmarks one `python -m bench.run` process each, in priority order, each only if
#      its usual duration still fits the soft budget and killed at the hard deadline, so a slow
#      step can neither stop the others from being recorded nor overrun the machine's time;
#   3. merges the steps into $OUT/run-gpu.json (run-cpu-quick.json with REID_DEVICE_QUICK=1) and
#      leaves every step's JSON and log, and this script's log, under $OUT.
#
# .device-wheels/ is git-ignored: fill it once on the development machine (numpy, Pillow, torch,
# torchvision and timm are in the GPU machines' image) and carry it with the run:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .device-wheels \
#       faiss-cpu fastapi uvicorn sqlalchemy alembic pydantic-settings python-multipart httpx \
#       typer safetensors pyyaml tqdm
#
# Knobs (environment): REID_DEVICE_STEPS (default "service embedding evaluation:quick fusion";
# NAME:quick runs that benchmark in its quick form, index runs only where FAISS sees a GPU),
# REID_DEVICE_BUDGET_S (soft budget, default 420), REID_DEVICE_HARD_S (hard deadline, default 470),
# REID_DEVICE_QUICK=1 (CPU, every step --quick), PYTHON (interpreter to use).
set -euo pipefail

started=$(date +%s)
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
quick="${REID_DEVICE_QUICK:-0}"
if [[ "$quick" == 1 ]]; then
    out="${OUT:-$repo/bench/results/device-quick}"
    device=cpu
    kind=cpu-quick
    default_steps="embedding evaluation service fusion index"
else
    out="${OUT:-$repo/bench/results/device}"
    device="${REID_DEVICE:-cuda}"
    kind=gpu
    # The issue's unmeasured goals first: HTTP query latency and ingestion (service), then
    # ingestion vs forward and torch.compile (embedding); evaluation and fusion were measured once.
    default_steps="service embedding evaluation:quick fusion"
fi
steps="${REID_DEVICE_STEPS:-$default_steps}"
budget="${REID_DEVICE_BUDGET_S:-420}"
hard="${REID_DEVICE_HARD_S:-470}"
mkdir -p "$out/steps"
exec > >(tee -a "$out/device.log") 2>&1
tee_pid=$!

log() { echo "[device.sh +$(($(date +%s) - started))s] $*"; }

# ---------------------------------------------------------------------------------- Python
python=""
for candidate in ${PYTHON:-} python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
        python="$candidate"
        break
    fi
done
if [[ -z "$python" ]]; then
    log "no Python that imports torch was found (set PYTHON=/path/to/python)"
    exit 2
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/reid-device.XXXXXX")"
# On exit: remove the private folder, then let tee write the last lines before the caller reads them.
trap 'rm -rf "$work"; exec 1>&- 2>&-; wait "$tee_pid" 2>/dev/null || true' EXIT
site="$work/site"
mkdir -p "$site"
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
log "python: $(command -v "$python")"
"$python" - <<'PY' || true
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PY
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

# --------------------------------------------------------------- offline dependencies + entry points
"$python" - "$repo" "$site" <<'PY' || log "dependency set-up reported a problem (see above); continuing"
import importlib, importlib.metadata as md, re, subprocess, sys, tomllib, zipfile
from pathlib import Path

repo, site = Path(sys.argv[1]), Path(sys.argv[2])
wheels_dir = repo / ".device-wheels"
NEEDED = ["fastapi", "uvicorn", "sqlalchemy", "alembic", "pydantic_settings", "multipart", "httpx",
          "typer", "safetensors", "yaml", "tqdm", "numpy", "PIL", "timm", "torchvision", "faiss"]


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(dist):
    try:
        md.distribution(dist)
        return True
    except md.PackageNotFoundError:
        return False


def missing_modules():
    importlib.invalidate_caches()
    out = []
    for mod in NEEDED:
        try:
            importlib.import_module(mod)
        except Exception as exc:  # an ImportError, or a broken install
            out.append(f"{mod} ({type(exc).__name__})")
    return out


def install(wheels):
    if not wheels:
        return
    print(f"installing {len(wheels)} wheel(s) into {site}: {', '.join(w.name for w in wheels)}", flush=True)
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site), "--quiet"]
    for extra in ([], ["--break-system-packages"]):  # Debian's pip refuses even --target without it
        if subprocess.run(base + extra + [str(w) for w in wheels]).returncode == 0:
            return
    print("pip could not install them: unpacking the wheels instead", flush=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
        for data in site.glob("*.data"):  # purelib/platlib payloads belong at the top level
            for sub in ("purelib", "platlib"):
                for item in (data / sub).glob("*") if (data / sub).is_dir() else []:
                    item.rename(site / item.name)


wheels = sorted(wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []
missing = missing_modules()
print("missing before set-up:", missing or "none", flush=True)
if missing and not wheels:
    print(f"no wheels in {wheels_dir}: benchmarks that need {missing} will fail", flush=True)
absent = [w for w in wheels if not installed(norm(w.name.split("-")[0]))]
if missing:
    install(absent)
    still = missing_modules()
    if still:  # an installed but unusable version: let the carried wheels shadow everything
        install([w for w in wheels if w not in absent])
missing = missing_modules()
print("missing after set-up:", missing or "none", flush=True)

# The project's console entry points, declared for an un-installed checkout.
if not list(md.entry_points(group="reid.commands")):
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    info = site / f"{norm(project['name']).replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    lines = []
    for group, entries in {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in entries.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    importlib.invalidate_caches()
print("reid commands:", sorted(ep.name for ep in md.entry_points(group="reid.commands")), flush=True)
PY

# ------------------------------------------------------------------------------------- steps
estimate() {  # usual seconds of a step on one H100/H200 (start-up included); CPU quick: small
    if [[ "$quick" == 1 ]]; then echo 5; return; fi
    case "$1" in
        embedding) echo 150 ;;  # up to 120 s of it is the torch.compile case (REID_BENCH_COMPILE_S)
        evaluation:quick) echo 20 ;;
        evaluation) echo 60 ;;
        service) echo 160 ;;  # 1M-item gallery: ~55 s of SQLite rows, snapshot, two start-ups
        fusion) echo 45 ;;
        index) echo 90 ;;
        *) echo 60 ;;
    esac
}

gpu_faiss() {
    "$python" -c "import faiss, sys; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)" >/dev/null 2>&1
}

ran=()
for step in $steps; do
    name="${step%%:*}"
    flags=()
    if [[ "$step" == *:quick || "$quick" == 1 ]]; then flags+=(--quick); fi
    now=$(date +%s)
    left_soft=$((started + budget - now))
    left_hard=$((started + hard - now))
    need=$(estimate "$step")
    if [[ "$name" == index && "$quick" != 1 ]] && ! gpu_faiss; then
        log "skip index: FAISS sees no GPU here (faiss-gpu wheel absent); GPU exact search is measured by embedding/search"
        continue
    fi
    if ((left_soft < need)); then
        log "skip $step: ${left_soft}s left of the ${budget}s budget, it usually needs ${need}s"
        continue
    fi
    step_env=()
    if [[ "$name" == service && "$quick" != 1 ]]; then
        # The service's default (auto: exact float16 search on the GPU without faiss-gpu, FAISS on
        # the GPU with it) unless told otherwise; the step's JSON names the backend, device, dtype.
        step_env=("REID_INDEX_BACKEND=${REID_DEVICE_SERVICE_INDEX:-auto}")
    fi
    log "run $step (${flags[*]:-full}) ${step_env[*]:-}, hard limit ${left_hard}s"
    set +e
    env "${step_env[@]}" timeout --signal=TERM --kill-after=10 "$left_hard" \
        "$python" -m bench.run --only "$name" --device "$device" "${flags[@]}" \
        --out "$out/steps/$name.json" >"$out/steps/$name.log" 2>&1
    status=$?
    set -e
    tail -n 5 "$out/steps/$name.log" | sed "s/^/    [$name] /"
    log "$step finished with status $status after $(($(date +%s) - now))s"
    ran+=("$name")
done

# ------------------------------------------------------------------------------------- merge
"$python" - "$out" "$kind" "$budget" "${ran[@]}" <<'PY'
import json, os, sys
from pathlib import Path

from bench.machine import write_result

out, kind, budget, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
figures, steps = {}, {}
for name in names:
    path = out / "steps" / f"{name}.json"
    if not path.is_file():
        figures[name] = {"error": f"no result: the step was killed or crashed (see steps/{name}.log)"}
        steps[name] = "no result"
        continue
    step_figures = json.loads(path.read_text())["figures"]
    figures.update(step_figures)
    steps[name] = "failed" if "error" in step_figures.get(name, {}) else "ok"
figures["device_sh"] = {
    "steps": steps,
    "budget_s": int(budget),
    "service_index_backend": os.environ.get("REID_DEVICE_SERVICE_INDEX", "auto") if kind == "gpu" else "auto",
}
target = write_result(out / f"run-{kind}.json", "run", figures)
print(f"wrote {target}: " + ", ".join(f"{k} {v}" for k, v in steps.items()))
PY
log "done in $(($(date +%s) - started))s; results in $out"
