"""The `roseinfer` command: generate, serve, bench."""

from __future__ import annotations

import argparse
import logging
import sys

from engine.config import LOG_FORMAT, add_engine_args, engine_config_from_args


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from engine.errors import EngineError
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            min_p=args.min_p, seed=args.sample_seed, stop=tuple(args.stop or ()), ignore_eos=args.ignore_eos,
            repetition_penalty=args.repetition_penalty,
        )
        with LLM(config=engine_config_from_args(args)) as llm:  # stops tensor-parallel workers at the end
            prompt = args.prompt
            if args.chat:
                prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            start = time.perf_counter()
            (out,) = llm.generate([prompt], params)
            elapsed = time.perf_counter() - start
    except EngineError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(out.text if args.chat else args.prompt + out.text)
    logging.getLogger("roseinfer").info(
        "%d tokens in %.2f s (%.1f tokens/s), finish_reason=%s",
        len(out.token_ids), elapsed, len(out.token_ids) / elapsed, out.finish_reason,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="roseinfer", description="OpenAI-compatible LLM inference server")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and print it")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=cmd_generate)

    try:
        from server.serve_cli import add_serve_parser
    except ImportError:  # the HTTP layer is optional for `generate`
        add_serve_parser = None
    if add_serve_parser is not None:
        add_serve_parser(sub)
    try:
        from engine.bench import add_bench_parser
    except ImportError:
        add_bench_parser = None
    if add_bench_parser is not None:
        add_bench_parser(sub)

    from load_tests.harness import add_loadtest_args, cmd_loadtest

    load = sub.add_parser("loadtest", help="load an OpenAI-compatible server over HTTP (same as python -m load_tests)")
    add_loadtest_args(load)
    load.set_defaults(func=cmd_loadtest)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
