#!/usr/bin/env bash
# Builds the guest kernel for openshell-driver-vm: an uncompressed x86-64 ELF
# vmlinux from Debian's linux-source-6.1 package, configured with `make
# tinyconfig` plus the project's fragment
# (crates/openshell-driver-vm/kernel/guest.config), and installs it where
# the driver looks for it by default. Takes about 3 minutes on 2 cores.
#
# The kernel is GPL-2.0. Its source is the linux-source-6.1 package
# (/usr/src/linux-source-6.1.tar.xz); `apt-get source linux` gives Debian's
# full source package. The install directory gets the exact .config and a
# note naming the source version.
#
# With --cache-dir DIR (or $OPENSHELL_KERNEL_CACHE) a finished vmlinux is
# kept as DIR/vmlinux-<key>, where the key hashes the config fragment, this
# script and the source package version; a later run with the same key
# copies it instead of building (CI builds the kernel once per machine).
# --clean-build removes the build tree after a successful build.
#
# Usage: scripts/build-guest-kernel.sh [--install-deps] [--output PATH]
#                                      [--build-dir DIR] [--jobs N]
#                                      [--cache-dir DIR] [--clean-build]
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
fragment="$here/crates/openshell-driver-vm/kernel/guest.config"
source_tarball=/usr/src/linux-source-6.1.tar.xz
source_package=linux-source-6.1
deps=(build-essential flex bison bc libelf-dev libssl-dev "$source_package")

if [ "$(id -u)" -eq 0 ]; then
  output=/usr/local/lib/openshell/vmlinux
else
  output="${XDG_DATA_HOME:-$HOME/.local/share}/openshell/vmlinux"
fi
build_dir="${XDG_CACHE_HOME:-$HOME/.cache}/openshell/guest-kernel"
jobs="$(nproc)"
install_deps=0
cache_dir="${OPENSHELL_KERNEL_CACHE:-}"
clean_build=0

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "build-guest-kernel: error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --install-deps) install_deps=1 ;;
    --output) output="${2:?--output needs a path}"; shift ;;
    --build-dir) build_dir="${2:?--build-dir needs a directory}"; shift ;;
    --jobs) jobs="${2:?--jobs needs a number}"; shift ;;
    --cache-dir) cache_dir="${2:?--cache-dir needs a directory}"; shift ;;
    --clean-build) clean_build=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
case "$output" in /*) ;; *) die "--output must be an absolute path" ;; esac
[ -f "$fragment" ] || die "config fragment $fragment is missing"

if [ "$install_deps" -eq 1 ]; then
  [ "$(id -u)" -eq 0 ] || die "--install-deps needs root (it runs apt-get install)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${deps[@]}"
fi

missing=()
for tool in gcc make flex bison bc; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
[ -e /usr/include/libelf.h ] || missing+=("libelf-dev")
[ -f "$source_tarball" ] || missing+=("$source_package")
if [ ${#missing[@]} -gt 0 ]; then
  die "missing: ${missing[*]}; install with: apt-get install ${deps[*]} (or rerun with --install-deps as root)"
fi

version="$(dpkg-query -W -f='${Version}' "$source_package" 2>/dev/null || echo unknown)"

install_kernel() { # install_kernel VMLINUX CONFIG
  mkdir -p "$(dirname "$output")"
  local tmp
  tmp="$(mktemp "$output.XXXXXX")"
  cp "$1" "$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$output"
  cp "$2" "$output.config"
}

key=""
if [ -n "$cache_dir" ]; then
  key="$(cat "$fragment" "$0" <(echo "$version") | sha256sum | cut -c1-16)"
  if [ -f "$cache_dir/vmlinux-$key" ] && [ -f "$cache_dir/vmlinux-$key.config" ]; then
    echo "== cached kernel $cache_dir/vmlinux-$key (key over guest.config, this script, $version)"
    install_kernel "$cache_dir/vmlinux-$key" "$cache_dir/vmlinux-$key.config"
    echo "== done: $(du -h "$output" | cut -f1) $output"
    exit 0
  fi
fi
src="$build_dir/linux-source-6.1"
stamp="$build_dir/.source-version"
mkdir -p "$build_dir"
if [ ! -d "$src" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$version" ]; then
  echo "== unpacking $source_tarball ($version) into $build_dir"
  rm -rf "$src"
  tar -C "$build_dir" -xf "$source_tarball"
  echo "$version" > "$stamp"
fi

cd "$src"
echo "== configuring: tinyconfig + $(basename "$fragment")"
make -s ARCH=x86_64 tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m -O . .config "$fragment" >/dev/null
make -s ARCH=x86_64 olddefconfig

# merge_config only warns when an option cannot be set; refuse instead.
dropped=()
while IFS= read -r line; do
  case "$line" in CONFIG_*=*) ;; *) continue ;; esac
  grep -qxF "$line" .config || dropped+=("$line")
done < "$fragment"
if [ ${#dropped[@]} -gt 0 ]; then
  die "these options did not survive olddefconfig (a dependency is missing): ${dropped[*]}"
fi

echo "== building vmlinux with $jobs jobs"
make -s ARCH=x86_64 -j"$jobs" vmlinux

echo "== installing $output"
install_kernel vmlinux .config
if [ -n "$key" ]; then
  mkdir -p "$cache_dir"
  cp vmlinux "$cache_dir/vmlinux-$key.tmp" && mv -f "$cache_dir/vmlinux-$key.tmp" "$cache_dir/vmlinux-$key"
  cp .config "$cache_dir/vmlinux-$key.config"
  echo "== cached as $cache_dir/vmlinux-$key"
fi
cat > "$output.txt" <<NOTE
Guest kernel for openshell-driver-vm.
Built $(date -u +%Y-%m-%dT%H:%M:%SZ) from Debian $source_package $version
($source_tarball) with make tinyconfig plus
crates/openshell-driver-vm/kernel/guest.config; the full configuration is
$(basename "$output").config. Licence: GPL-2.0. Source: the $source_package
package, or \`apt-get source linux\` for Debian's complete source package.
NOTE
echo "== done: $(du -h "$output" | cut -f1) $output"
if [ "$clean_build" -eq 1 ]; then
  cd /
  rm -rf "$src" "$stamp"
fi
