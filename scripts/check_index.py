"""Tell whether pip's package index is reachable: prints the index URL and exits 1 when it is not.

Used by scripts/setup.sh after a failed pip install, because pip itself only says
'No matching distribution found' when it cannot connect.
"""
import os
import subprocess
import sys
import urllib.error
import urllib.request


def index_url() -> str:
    url = os.environ.get('PIP_INDEX_URL')
    if url:
        return url
    out = subprocess.run([sys.executable, '-m', 'pip', 'config', 'get', 'global.index-url'],
                         capture_output=True, text=True).stdout.strip()
    return out or 'https://pypi.org/simple'


def main() -> int:
    url = index_url().rstrip('/') + '/pip/'
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read(1)
    except (urllib.error.URLError, OSError) as exc:
        print(f'{url} ({getattr(exc, "reason", exc)})')
        return 1
    print(url)
    return 0


if __name__ == '__main__':
    sys.exit(main())
