#!/usr/bin/env python3
"""Puts a benchmark's report into docs/benchmarks.md, under its own heading, replacing the
section of an earlier run (up to the next heading).

Usage: bench/write-docs.py TITLE REPORT_FILE, where TITLE is the section heading without the
leading "## ", such as "NBD with write capture (`bench/nbd.sh`)".
"""
import datetime
import os
import platform
import re
import sys

title, report_path = sys.argv[1], sys.argv[2]
report = open(report_path).read()
path = "docs/benchmarks.md"
doc = open(path).read() if os.path.exists(path) else (
    "# Benchmarks\n\nResults of `bench/*.sh` on the project's CI machine kind (2 cores, 24 GiB). "
    "Ratios compare Boomerang with a peer measured in the same run.\n"
)
section = (
    f"## {title}\n\nRun on {datetime.date.today()} ({os.cpu_count()} cores, {platform.machine()}).\n\n"
    f"{report.rstrip()}\n"
)
heading = re.escape(f"## {title}")
if re.search(heading, doc):
    doc = re.sub(heading + r".*?(?=\n## |\Z)", lambda m: section, doc, count=1, flags=re.S)
else:
    doc = doc.rstrip("\n") + "\n\n" + section
open(path, "w").write(doc.rstrip("\n") + "\n")
