#!/usr/bin/env python3
"""Checks the BR2_EXTERNAL tree in buildroot/ without Buildroot (which cannot be fetched here).

    python tools/check-buildroot.py [TREE] [--json]

What Buildroot would trip over first, checked statically:
  - external.desc names the tree, and every $(BR2_EXTERNAL_<NAME>_PATH) uses that name
  - every package/<pkg>/ is sourced from Config.in, has <pkg>.mk and a Config.in defining
    BR2_PACKAGE_<PKG>; external.mk includes the .mk files; each .mk sets its VERSION and
    SITE with the package's own prefix and ends in $(eval $(<infra>-package)); a python
    package says its SETUP_TYPE; a downloaded source has a .hash entry; a local SITE exists
  - every BR2_PACKAGE_* a defconfig enables or a Config.in selects that belongs to one of
    our packages is defined by our Config.in files
  - every file a defconfig names (overlays, post scripts, genimage, kernel and BusyBox
    fragments, bootloader configs) exists, and post-image.sh finds its board's
    genimage.cfg and board.json
  - every shell script passes `sh -n` (`bash -n` for bash scripts), the scripts Buildroot
    runs are executable, every Python file compiles, every JSON file parses
Exit 0 when all hold; otherwise one line per problem and exit 1.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INFRAS = ("generic", "python", "cmake", "autotools", "meson", "cargo", "golang", "kconfig")
SETUP_TYPES = ("setuptools", "pep517", "flit", "maturin", "hatch", "poetry", "setuptools-rust")


class Checker:
    def __init__(self, tree: Path) -> None:
        self.tree = tree
        self.problems: list[str] = []
        self.name = ""
        self.symbols: set[str] = set()
        self.package_symbols: set[str] = set()
        self.counts = {"packages": 0, "defconfigs": 0, "scripts": 0, "files_named": 0}

    def bad(self, where: Path | str, message: str) -> None:
        rel = where.relative_to(self.tree) if isinstance(where, Path) else where
        self.problems.append(f"{rel}: {message}")

    def expand(self, value: str) -> Path | None:
        """A path written with $(BR2_EXTERNAL_<NAME>_PATH) (or ${...}, or $BR2_...)."""
        m = re.match(r"^\$[({]?BR2_EXTERNAL_(\w+?)_PATH[)}]?(/.*)?$", value)
        if not m:
            return None
        if m.group(1) != self.name:
            return Path("/nonexistent-tree-" + m.group(1))
        return self.tree / (m.group(2) or "/").lstrip("/")

    # --- external.desc, Config.in, external.mk ---------------------------------------
    def check_desc(self) -> None:
        desc = self.tree / "external.desc"
        if not desc.is_file():
            self.bad("external.desc", "missing")
            return
        fields = {}
        for line in desc.read_text().splitlines():
            if not line.strip():
                continue
            key, sep, value = line.partition(":")
            if not sep:
                self.bad(desc, f"line {line!r} is not 'key: value'")
                continue
            fields[key.strip()] = value.strip()
        name = fields.get("name", "")
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            self.bad(desc, f"name must be letters, digits and underscores, not {name!r}")
        unknown = set(fields) - {"name", "desc"}
        if unknown:
            self.bad(desc, f"unknown field(s): {', '.join(sorted(unknown))}")
        self.name = name
        for p in sorted(self.tree.rglob("*")):
            if p.is_file() and p.suffix not in (".py", ".json"):
                text = p.read_text(errors="replace")
                for other in sorted(set(re.findall(r"BR2_EXTERNAL_(\w+?)_PATH", text))):
                    if other != name:
                        self.bad(p, f"uses BR2_EXTERNAL_{other}_PATH but the tree is {name!r}")

    def check_packages(self) -> None:
        config_in = self.tree / "Config.in"
        sourced: set[str] = set()
        if not config_in.is_file():
            self.bad("Config.in", "missing")
        else:
            for m in re.finditer(r'^\s*source\s+"([^"]+)"', config_in.read_text(), re.M):
                path = self.expand(m.group(1))
                if path is None:
                    self.bad(config_in, f"source {m.group(1)!r} is not under the tree's path")
                elif not path.is_file():
                    self.bad(config_in, f"sources {m.group(1)}, which does not exist")
                else:
                    sourced.add(str(path.parent.relative_to(self.tree)))
        ext_mk = self.tree / "external.mk"
        mk_text = ext_mk.read_text() if ext_mk.is_file() else ""
        if not mk_text:
            self.bad("external.mk", "missing or empty")
        includes_all = "package/*/*.mk" in mk_text
        pkg_root = self.tree / "package"
        dirs = sorted(p for p in pkg_root.iterdir() if p.is_dir()) if pkg_root.is_dir() else []
        for d in dirs:
            self.counts["packages"] += 1
            rel = str(d.relative_to(self.tree))
            if rel not in sourced:
                self.bad(d, f"not sourced from Config.in (add: source \"$BR2_EXTERNAL_"
                            f"{self.name}_PATH/{rel}/Config.in\")")  # fmt: skip
            if not includes_all and f"{rel}/{d.name}.mk" not in mk_text:
                self.bad("external.mk", f"does not include {rel}/{d.name}.mk")
            self.check_package(d)

    def check_package(self, d: Path) -> None:
        upper = d.name.upper().replace("-", "_")
        symbol = f"BR2_PACKAGE_{upper}"
        cfg = d / "Config.in"
        if not cfg.is_file():
            self.bad(d, "has no Config.in")
        else:
            defined = set(re.findall(r"^\s*(?:menu)?config\s+(\w+)", cfg.read_text(), re.M))
            if symbol not in defined:
                self.bad(cfg, f"does not define {symbol}")
            self.symbols |= defined
            self.package_symbols.add(symbol)
        mk = d / f"{d.name}.mk"
        if not mk.is_file():
            self.bad(d, f"has no {d.name}.mk")
            return
        text = mk.read_text()
        variables = dict(re.findall(r"^(\w+)\s*[+:?]?=\s*(.*)$", text, re.M))
        for var in ("VERSION", "SITE"):
            if f"{upper}_{var}" not in variables:
                self.bad(mk, f"does not set {upper}_{var}")
        for var in variables:
            if var.isupper() and not var.startswith(upper + "_") and not var.startswith("BR2_"):
                self.bad(mk, f"sets {var}: a package's variables start with {upper}_")
        m = re.search(r"^\$\(eval \$\((host-)?(\w+)-package\)\)\s*$", text, re.M)
        if not m or m.group(2) not in INFRAS:
            self.bad(mk, "does not end in $(eval $(<infrastructure>-package))")
        elif m.group(2) == "python":
            setup = variables.get(f"{upper}_SETUP_TYPE", "")
            if setup not in SETUP_TYPES:
                self.bad(mk, f"python-package needs {upper}_SETUP_TYPE (one of {SETUP_TYPES})")
        site = variables.get(f"{upper}_SITE", "")
        method = variables.get(f"{upper}_SITE_METHOD", "")
        if method == "local":
            path = self.expand(site)
            if path is None or not path.resolve().exists():
                self.bad(mk, f"local SITE {site} does not exist")
        elif site:
            source = variables.get(f"{upper}_SOURCE") or f"{d.name}-$({upper}_VERSION).tar.gz"
            source = source.replace(f"$({upper}_VERSION)", variables.get(f"{upper}_VERSION", ""))
            self.check_hash(d, source)
        extra = variables.get(f"{upper}_EXTRA_DOWNLOADS", "")
        for url in re.findall(r"\S+://\S+", extra.replace("\\", " ")):
            self.check_hash(d, url.rsplit("/", 1)[-1])

    def check_hash(self, d: Path, source: str) -> None:
        hashes = d / f"{d.name}.hash"
        if not hashes.is_file():
            self.bad(d, f"downloads {source} but has no {d.name}.hash")
            return
        found = [
            line.split() for line in hashes.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]  # fmt: skip
        if not any(len(f) == 3 and f[2] == source and len(f[1]) == 64 for f in found):
            self.bad(hashes, f"has no sha256 line for {source}")

    # --- defconfigs ----------------------------------------------------------------------
    def check_selects(self) -> None:
        for cfg in sorted(self.tree.rglob("Config.in")):
            for sym in re.findall(r"^\s*select\s+(\w+)", cfg.read_text(), re.M):
                self.check_symbol(cfg, sym, "selects")

    def ours(self, sym: str) -> bool:
        return any(sym == s or sym.startswith(s + "_") for s in self.package_symbols)

    def check_symbol(self, where: Path, sym: str, verb: str) -> None:
        if self.ours(sym) and sym not in self.symbols:
            self.bad(where, f"{verb} {sym}, which none of our Config.in files defines")

    def check_defconfigs(self) -> None:
        configs = sorted((self.tree / "configs").glob("*_defconfig"))
        if not configs:
            self.bad("configs", "no *_defconfig")
        for cfg in configs:
            self.counts["defconfigs"] += 1
            values: dict[str, str] = {}
            for n, line in enumerate(cfg.read_text().splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                m = re.fullmatch(r'(BR2_\w+)=(y|"[^"]*"|[\w.-]+)', line)
                if not m:
                    self.bad(cfg, f"line {n} is not SYMBOL=value: {line!r}")
                    continue
                sym, value = m.groups()
                values[sym] = value.strip('"')
                if value == "y":
                    self.check_symbol(cfg, sym, "enables")
                if value.startswith('"'):
                    for word in value.strip('"').split():
                        if "BR2_EXTERNAL" not in word:
                            continue
                        path = self.expand(word)
                        self.counts["files_named"] += 1
                        if path is None or not path.exists():
                            self.bad(cfg, f"{sym} names {word}, which does not exist")
            if not any(self.ours(s) for s in values):
                self.bad(cfg, "enables none of our packages")
            board = values.get("BR2_ROOTFS_POST_SCRIPT_ARGS", "").split()
            if "BR2_ROOTFS_POST_IMAGE_SCRIPT" in values:
                if not board:
                    self.bad(cfg, "post-image.sh needs the board in BR2_ROOTFS_POST_SCRIPT_ARGS")
                else:
                    for f in ("genimage.cfg", "board.json"):
                        if not (self.tree / "board" / board[0] / f).is_file():
                            self.bad(cfg, f"board {board[0]} has no board/{board[0]}/{f}")

    # --- scripts and files ---------------------------------------------------------------
    def check_files(self) -> None:
        for p in sorted(self.tree.rglob("*")):
            if not p.is_file():
                continue
            head = p.read_bytes()[:64]
            first = head.split(b"\n")[0] if head.startswith(b"#!") else b""
            shell = None
            if b"bash" in first:
                shell = "bash"
            elif re.search(rb"\bsh\b", first) or p.suffix == ".sh":
                shell = "sh"
            if shell:
                self.counts["scripts"] += 1
                exe = shutil.which(shell) or f"/bin/{shell}"
                out = subprocess.run([exe, "-n", str(p)], capture_output=True, text=True)
                if out.returncode != 0:
                    self.bad(p, f"{shell} -n: {out.stderr.strip()}")
                if not p.stat().st_mode & 0o111:
                    self.bad(p, "is a script but not executable (chmod +x)")
            if p.suffix == ".py":
                try:
                    compile(p.read_bytes(), str(p), "exec")
                except SyntaxError as e:
                    self.bad(p, f"does not compile: {e.msg} (line {e.lineno})")
            if p.suffix == ".json":
                try:
                    json.loads(p.read_text())
                except ValueError as e:
                    self.bad(p, f"is not valid JSON: {e}")

    def run(self) -> list[str]:
        if not self.tree.is_dir():
            return [f"{self.tree}: no such directory"]
        self.check_desc()
        self.check_packages()
        self.check_selects()
        self.check_defconfigs()
        self.check_files()
        return self.problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tree", nargs="?", type=Path, default=ROOT / "buildroot")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    checker = Checker(args.tree.resolve())
    problems = checker.run()
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems, **checker.counts}, indent=2))
    else:
        for p in problems:
            print(f"check-buildroot: {p}")
        c = checker.counts
        summary = (f"{c['packages']} packages, {c['defconfigs']} defconfigs, "
                   f"{c['files_named']} files named, {c['scripts']} scripts")  # fmt: skip
        if problems:
            print(f"check-buildroot: {len(problems)} problem(s) ({summary})", file=sys.stderr)
        else:
            print(f"check-buildroot: ok ({summary})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
