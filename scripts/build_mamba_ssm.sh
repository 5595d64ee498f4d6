#!/usr/bin/env bash
# Build mamba-ssm (and optionally causal-conv1d) CUDA kernels for ONE GPU architecture, offline.
#
# Why this script exists (facts from the source packages of mamba-ssm 2.3.2.post1 and
# causal-conv1d 1.7.0):
#   * both are source-only on PyPI and their setup.py imports torch, so the install needs
#     `--no-build-isolation` (an isolated build fails or pulls another torch);
#   * setup.py first tries to download a prebuilt wheel from GitHub; offline that raises an
#     uncaught URLError. MAMBA_FORCE_BUILD=TRUE / CAUSAL_CONV1D_FORCE_BUILD=TRUE skip it;
#   * TORCH_CUDA_ARCH_LIST is ignored: setup.py appends its own `-gencode` flags for about nine
#     architectures (with nvcc 13). This script rewrites setup.py so that `cc_flag` holds only
#     `-gencode arch=compute_<ARCH>,code=sm_<ARCH>`, which cuts the compile time several-fold.
#
# Getting the source packages (on a machine with internet; the SKIP variables only let pip read
# the package metadata without a CUDA torch, nothing is compiled):
#   MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
#     pip download --no-deps --no-binary :all: --no-build-isolation \
#       mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0 -d ~/.cache/echomamba/sdist
#   pip download --only-binary :all: --python-version 3.12 ninja einops -d wheels/   # optional
#
# Usage:
#   scripts/build_mamba_ssm.sh [options] [SDIST_DIR]
# Options:
#   --src DIR              directory holding mamba_ssm-<ver>.tar.gz (and causal_conv1d-<ver>.tar.gz);
#                          default: $ECHOMAMBA_SDIST_DIR or ~/.cache/echomamba/sdist
#   --wheels DIR           install ninja and einops from this wheel directory first (no index)
#   --arch N               compute capability without the dot: 90 (H100, default), 80 (A100), 86 ...
#   --with-causal-conv1d   also build causal-conv1d (slow: its backward kernel alone takes minutes)
#   --work DIR             unpack here (default: a new temporary directory, removed at the end)
#   --dry-run              stop after unpacking and editing setup.py; print the cc_flag lines
#   --mamba-version V      default 2.3.2.post1
#   --causal-conv1d-version V   default 1.7.0
#   -h, --help
# Environment: PYTHON (default: python), MAX_JOBS (default: nproc), CUDA_HOME (default: from nvcc).
set -euo pipefail

PROG=build_mamba_ssm
die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }
usage() { sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

SRC_DIR="${ECHOMAMBA_SDIST_DIR:-$HOME/.cache/echomamba/sdist}"
WHEELS=""
ARCH=90
WITH_CONV=0
WORK=""
DRY_RUN=0
MAMBA_VERSION=2.3.2.post1
CONV_VERSION=1.7.0
PYTHON="${PYTHON:-python}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --src) SRC_DIR="${2:?--src needs a directory}"; shift 2 ;;
        --wheels) WHEELS="${2:?--wheels needs a directory}"; shift 2 ;;
        --arch) ARCH="${2:?--arch needs a value}"; shift 2 ;;
        --with-causal-conv1d) WITH_CONV=1; shift ;;
        --work) WORK="${2:?--work needs a directory}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --mamba-version) MAMBA_VERSION="${2:?}"; shift 2 ;;
        --causal-conv1d-version) CONV_VERSION="${2:?}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) SRC_DIR="$1"; shift ;;
    esac
done

ARCH="${ARCH//./}"        # accept 9.0 as well as 90
ARCH="${ARCH#sm_}"
[[ "$ARCH" =~ ^[0-9]{2,3}[a-z]?$ ]] || die "--arch: expected a compute capability such as 90 or 80, got '$ARCH'"
[[ -d "$SRC_DIR" ]] || die "source directory $SRC_DIR does not exist (download the sdists first, see --help)"

CLEAN_WORK=0
if [[ -z "$WORK" ]]; then
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/build_mamba_ssm.XXXXXX")"
    CLEAN_WORK=1
fi
mkdir -p "$WORK"
cleanup() { if [[ $CLEAN_WORK == 1 ]]; then rm -rf "$WORK"; fi; }
trap cleanup EXIT

# find_sdist NAME VERSION -> path of NAME-VERSION.tar.gz in SRC_DIR (underscore or dash spelling)
find_sdist() {
    local name="$1" version="$2" candidate
    for candidate in "$SRC_DIR/${name}-${version}.tar.gz" "$SRC_DIR/${name//_/-}-${version}.tar.gz"; do
        if [[ -f "$candidate" ]]; then echo "$candidate"; return 0; fi
    done
    die "no ${name}-${version}.tar.gz in $SRC_DIR"
}

# unpack TARBALL -> prints the unpacked source directory (the one holding setup.py)
unpack() {
    local tarball="$1" top
    top="$(tar -tzf "$tarball" | head -n 1 | cut -d/ -f1)"
    [[ -n "$top" ]] || die "$tarball: empty archive"
    rm -rf "${WORK:?}/$top"
    tar -xzf "$tarball" -C "$WORK"
    [[ -f "$WORK/$top/setup.py" ]] || die "$tarball: no setup.py in $top/"
    echo "$WORK/$top"
}

# patch_cc_flag SETUP_PY: keep a single -gencode pair for $ARCH in cc_flag.
# The layout expected (mamba-ssm 2.3.2.post1, causal-conv1d 1.7.0), inside the CUDA branch:
#         cc_flag.append("-gencode")
#         cc_flag.append("arch=compute_75,code=sm_75")
#         ...
#         if bare_metal_version >= Version("11.8"):
#             cc_flag.append("-gencode")
#             cc_flag.append("arch=compute_90,code=sm_90")
# The first "-gencode" line (unconditional) becomes `cc_flag += ["-gencode", "arch=..."]`, every
# other -gencode / arch line becomes `pass` (so the `if` blocks stay valid Python).
patch_cc_flag() {
    local setup="$1"
    local gencode_re='^([[:space:]]*)cc_flag\.append\("-gencode"\)[[:space:]]*$'
    local arch_re='^([[:space:]]*)cc_flag\.append\("arch=compute_[0-9]+[a-z]?,code=sm_[0-9]+[a-z]?"\)[[:space:]]*$'
    local wanted="arch=compute_${ARCH},code=sm_${ARCH}"
    local n_gencode n_arch n_any first_indent cuda_indent

    # --- before: the layout must be the one we know, else stop instead of building 9 archs.
    n_gencode="$(grep -cE "$gencode_re" "$setup" || true)"
    n_arch="$(grep -cE "$arch_re" "$setup" || true)"
    n_any="$(grep -c 'arch=compute_' "$setup" || true)"
    if [[ "$n_gencode" -lt 1 || "$n_gencode" != "$n_arch" || "$n_any" != "$n_arch" ]]; then
        die "$setup: unexpected cc_flag layout (${n_gencode} '-gencode' lines, ${n_arch} arch lines," \
            "${n_any} lines mentioning arch=compute_); refusing to edit. Inspect it by hand."
    fi
    grep -qE '^[[:space:]]*check_if_cuda_home_none\(' "$setup" \
        || die "$setup: no check_if_cuda_home_none( line: unexpected layout, refusing to edit"
    if grep -q 'edited by build_mamba_ssm' "$setup"; then
        die "$setup: already edited (unpack a fresh copy)"
    fi

    # --- edit (GNU sed: 0,/re/ limits the first substitution to the first match)
    sed -E -i \
        -e "0,/${gencode_re}/s//\\1cc_flag += [\"-gencode\", \"${wanted}\"]  # edited by build_mamba_ssm.sh/" \
        "$setup"
    sed -E -i \
        -e "s/${gencode_re}/\\1pass  # -gencode removed by build_mamba_ssm.sh/" \
        -e "s/${arch_re}/\\1pass  # arch removed by build_mamba_ssm.sh/" \
        "$setup"

    # --- after: exactly one arch line, ours; it sits in the CUDA branch, unconditionally.
    n_any="$(grep -c 'arch=compute_' "$setup" || true)"
    [[ "$n_any" == 1 ]] || die "$setup: after the edit $n_any lines mention arch=compute_ (expected 1)"
    grep -qF "cc_flag += [\"-gencode\", \"${wanted}\"]" "$setup" \
        || die "$setup: the ${wanted} flag is missing after the edit"
    if grep -qE "$gencode_re|$arch_re" "$setup"; then
        die "$setup: -gencode/arch appends are left after the edit"
    fi
    first_indent="$(grep -E 'cc_flag \+= \["-gencode"' "$setup" | sed -E 's/^([[:space:]]*).*/\1/' | wc -c)"
    cuda_indent="$(grep -E '^[[:space:]]*check_if_cuda_home_none\(' "$setup" | head -n 1 | sed -E 's/^([[:space:]]*).*/\1/' | wc -c)"
    [[ "$first_indent" == "$cuda_indent" ]] \
        || die "$setup: the new flag line is not at the CUDA branch's indentation (nested in an if?)"
    "$PYTHON" -c 'import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])' "$setup" \
        || die "$setup: not valid Python after the edit"
}

show_cc_flag() {
    local setup="$1"
    echo "== $setup: cc_flag lines after the edit"
    grep -n 'cc_flag' "$setup"
}

PKG_DIRS=()
MAMBA_DIR="$(unpack "$(find_sdist mamba_ssm "$MAMBA_VERSION")")"
patch_cc_flag "$MAMBA_DIR/setup.py"
PKG_DIRS+=("$MAMBA_DIR")
if [[ $WITH_CONV == 1 ]]; then
    CONV_DIR="$(unpack "$(find_sdist causal_conv1d "$CONV_VERSION")")"
    patch_cc_flag "$CONV_DIR/setup.py"
    PKG_DIRS=("$CONV_DIR" "${PKG_DIRS[@]}")   # causal-conv1d first: mamba-ssm uses it if present
fi

if [[ $DRY_RUN == 1 ]]; then
    for dir in "${PKG_DIRS[@]}"; do show_cc_flag "$dir/setup.py"; done
    if [[ $CLEAN_WORK == 1 ]]; then
        echo "dry run: edited for sm_${ARCH} in a temporary directory (removed; --work DIR keeps it); nothing compiled"
    else
        echo "dry run: unpacked and edited for sm_${ARCH} under $WORK; nothing compiled"
    fi
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# The real build: needs a CUDA build of torch and nvcc.
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' \
    || die "the torch of '$PYTHON' is not a CUDA build (torch.version.cuda is None)"
if [[ -z "${CUDA_HOME:-}" ]]; then
    if command -v nvcc >/dev/null 2>&1; then
        CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
    elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
        CUDA_HOME=/usr/local/cuda
    else
        die "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    fi
fi
[[ -x "$CUDA_HOME/bin/nvcc" ]] || die "$CUDA_HOME/bin/nvcc is missing"
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"

if [[ -n "$WHEELS" ]]; then
    [[ -d "$WHEELS" ]] || die "--wheels: $WHEELS is not a directory"
    "$PYTHON" -m pip install --no-index --find-links "$WHEELS" ninja einops
fi
command -v ninja >/dev/null 2>&1 \
    || log "warning: ninja not found; torch will compile the kernels one file at a time (slow)"

export MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# Ignored by these setup.py files (see above) but read by torch's cpp_extension for its own flags.
ARCH_DIGITS="${ARCH%%[a-z]}"
export TORCH_CUDA_ARCH_LIST="${ARCH_DIGITS:0:${#ARCH_DIGITS}-1}.${ARCH_DIGITS: -1}${ARCH#"$ARCH_DIGITS"}"
log "building for sm_${ARCH} with nvcc $("$CUDA_HOME/bin/nvcc" --version | tail -n 1), MAX_JOBS=$MAX_JOBS"

for dir in "${PKG_DIRS[@]}"; do
    log "pip install --no-build-isolation --no-deps $dir"
    (cd "$dir" && "$PYTHON" -m pip install --no-build-isolation --no-deps -v .)
done

# The compiled extensions must import; `import mamba_ssm` itself also needs einops, triton and
# transformers at run time (its __init__ imports the whole model zoo).
"$PYTHON" -c 'import torch, selective_scan_cuda; print("selective_scan_cuda:", selective_scan_cuda.__file__)' \
    || die "selective_scan_cuda does not import"
if [[ $WITH_CONV == 1 ]]; then
    "$PYTHON" -c 'import torch, causal_conv1d_cuda; print("causal_conv1d_cuda:", causal_conv1d_cuda.__file__)' \
        || die "causal_conv1d_cuda does not import"
fi
"$PYTHON" -c 'from mamba_ssm.ops.selective_scan_interface import selective_scan_fn' \
    || die "the kernels built, but 'import mamba_ssm' fails: install its run-time dependencies (einops, triton, transformers)"
log "done: mamba-ssm ${MAMBA_VERSION} built for sm_${ARCH}"
