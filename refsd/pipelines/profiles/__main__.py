"""``python -m refsd.pipelines.profiles [--write-docs]``: print the profile table, or rewrite
docs/pipelines.md's generated table from the Profile objects."""

import sys

from refsd.pipelines.profiles import DOCS, render_table, write_docs

if __name__ == "__main__":
    if sys.argv[1:] == ["--write-docs"]:
        print(f"{DOCS}: {'rewritten' if write_docs() else 'already up to date'}")
    elif sys.argv[1:]:
        sys.exit("usage: python -m refsd.pipelines.profiles [--write-docs]")
    else:
        print(render_table())
