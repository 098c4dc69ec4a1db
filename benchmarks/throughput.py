"""The seed throughput benchmark (same as `nanovllm bench`); see nanovllm/commands/bench.py for the workload and floor.

    python benchmarks/throughput.py --backend cuda --config ../shared/models/qwen3-0.6b/config.json
"""
import argparse
import sys

from nanovllm.commands import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    sys.exit(bench.main(parser.parse_args()))
