"""The `pad-moe` command line: `convert`, `inspect`, `analyze` and `export` (docs/cli.md, docs/deploy.md).

    pad-moe convert bert-base-uncased out/rte_pad --task rte --data_dir glue_data
    pad-moe inspect out/rte_pad --plot rte_pad.png
    pad-moe analyze dense=bert-base-uncased pad=out/rte_pad --task rte --data_dir glue_data
    pad-moe export out/rte_pad out/rte_pad_onnx

`main(argv)` runs it in-process and returns the exit code (0 on success, 2 for bad input, 1 when a
library call fails); the console script `pad-moe` is `sys.exit(main())`.
"""

from .main import build_parser, console_main, main

__all__ = ["build_parser", "console_main", "main"]
