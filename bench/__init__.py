"""jvt benchmark suite: `python -m bench --out DIR [--smoke] [--only a,b]`.

Each module measures one thing against its peers and adds tables, JSON records and plots to a
shared `bench.common.Report`; `bench.run` runs the selected parts in one process.
"""
