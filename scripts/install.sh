#!/bin/sh
# Production install of dicom-node on a systemd host (Debian 12 / Ubuntu 22.04+).
#
#   sudo scripts/install.sh            # or: sudo make install
#
# What it does, each step skipped when already done (running it again upgrades):
#   1. the system user and group dicom-node (systemd-sysusers, else useradd)
#   2. /opt/dicom-node/.venv with dicom-node and its dependencies (pip)
#   3. the models in /opt/dicom-node/models
#   4. /etc/dicom-node/node.yaml from conf/node.yaml, with data_dir
#      /var/lib/dicom-node and models_dir /opt/dicom-node/models; an existing
#      node.yaml is kept and the new one written next to it as node.yaml.new
#   5. /var/lib/dicom-node (0750, owned by dicom-node)
#   6. the unit /etc/systemd/system/dicom-node.service, plus the GPU drop-in
#      dicom-node.service.d/gpu.conf when /dev/nvidiactl exists (or --gpu)
#   7. systemd-analyze verify on the installed unit, dicom-node check-config
#      on the installed config, then systemctl enable --now dicom-node
#
# Options:
#   --gpu | --no-gpu    install the NVIDIA drop-in or not (default: detect)
#   --no-enable         install everything but do not enable or start the unit
#   --dry-run           print what would be done, change nothing
# Environment:
#   DESTDIR             install under this root instead of / (packaging, tests):
#                       users go to $DESTDIR/etc/passwd, nothing is enabled
#   PYTHON              the interpreter for the venv (default python3; Debian
#                       needs the python3-venv package)
#   PIP_ARGS            extra arguments for pip install (e.g. --no-index --find-links DIR)
#   PACKAGE             what pip installs: this source tree (default), or a built
#                       wheel, e.g. for an offline host with a wheelhouse
set -eu

SRC=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-python3}
PIP_ARGS=${PIP_ARGS:-}
PACKAGE=${PACKAGE:-$SRC}
PREFIX=/opt/dicom-node
CONFDIR=/etc/dicom-node
STATEDIR=/var/lib/dicom-node
UNITDIR=/etc/systemd/system
USER_NAME=dicom-node
GPU=auto
ENABLE=yes
DRY=no

for arg in "$@"; do
  case $arg in
    --gpu) GPU=yes ;;
    --no-gpu) GPU=no ;;
    --no-enable) ENABLE=no ;;
    --dry-run) DRY=yes ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf '==> %s\n' "$*"; }
run() {
  printf '    %s\n' "$*"
  [ "$DRY" = yes ] || "$@"
}

if [ -z "$DESTDIR" ] && [ "$DRY" = no ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (sudo), or set DESTDIR to install under another root" >&2
  exit 1
fi
if [ "$GPU" = auto ]; then
  if [ -e /dev/nvidiactl ]; then GPU=yes; else GPU=no; fi
fi
if ! "$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "install.sh: $PYTHON must be Python 3.11 or newer with venv and ensurepip" \
       "(Debian: apt-get install python3-venv)" >&2
  exit 1
fi

# 1. user and group -------------------------------------------------------------
say "system user $USER_NAME"
SYSUSERS_CONF="$DESTDIR/usr/lib/sysusers.d/dicom-node.conf"
run mkdir -p "$(dirname "$SYSUSERS_CONF")"
if [ "$DRY" = no ]; then
  printf 'u %s - "dicom-node AI inference DICOM node" %s /usr/sbin/nologin\n' \
    "$USER_NAME" "$STATEDIR" > "$SYSUSERS_CONF"
fi
if command -v systemd-sysusers >/dev/null 2>&1; then
  if [ -n "$DESTDIR" ]; then
    run mkdir -p "$DESTDIR/etc"
    run systemd-sysusers --root="$DESTDIR" "$SYSUSERS_CONF"
  else
    run systemd-sysusers "$SYSUSERS_CONF"
  fi
elif [ -z "$DESTDIR" ] && ! id "$USER_NAME" >/dev/null 2>&1; then
  run useradd --system --user-group --home-dir "$STATEDIR" --no-create-home \
      --shell /usr/sbin/nologin "$USER_NAME"
fi
# Ownership by name works only where the user exists (not under DESTDIR).
if [ -z "$DESTDIR" ]; then OWNER="$USER_NAME"; else OWNER=""; fi
own() { # own MODE USER:GROUP PATH -- chown skipped under DESTDIR
  run chmod "$1" "$3"
  if [ -n "$OWNER" ]; then run chown "$2" "$3"; fi
}

# 2. the venv -------------------------------------------------------------------
say "venv $PREFIX/.venv"
run mkdir -p "$DESTDIR$PREFIX"
if [ ! -x "$DESTDIR$PREFIX/.venv/bin/python" ]; then
  run "$PYTHON" -m venv "$DESTDIR$PREFIX/.venv"
fi
# shellcheck disable=SC2086 # PIP_ARGS is a list of arguments
run "$DESTDIR$PREFIX/.venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-warn-script-location $PIP_ARGS "$PACKAGE"

# 3. models -----------------------------------------------------------------------
say "models $PREFIX/models"
run mkdir -p "$DESTDIR$PREFIX/models"
for f in "$SRC"/models_onnx/*.onnx "$SRC"/models_onnx/*.yaml; do
  run install -m 0644 "$f" "$DESTDIR$PREFIX/models/"
done

# 4. config -------------------------------------------------------------------------
say "config $CONFDIR/node.yaml"
run mkdir -p "$DESTDIR$CONFDIR"
own 0755 "root:$USER_NAME" "$DESTDIR$CONFDIR"
target="$DESTDIR$CONFDIR/node.yaml"
[ -e "$target" ] && target="$target.new" && say "keeping the existing node.yaml; new default in node.yaml.new"
if [ "$DRY" = no ]; then
  sed -e "s|^  data_dir: data\$|  data_dir: $STATEDIR|" \
      -e "s|^inference:\$|inference:\n  models_dir: $PREFIX/models|" \
      -e "s|^# Runs with nothing else installed.*|# Installed by scripts/install.sh for the systemd unit dicom-node.service.|" \
      "$SRC/conf/node.yaml" > "$target"
  grep -q "^  data_dir: $STATEDIR\$" "$target" && grep -q "^  models_dir: $PREFIX/models\$" "$target" || {
    echo "install.sh: could not set data_dir/models_dir in $target; edit it by hand" >&2; exit 1; }
fi
printf '    (node.yaml: data_dir %s, models_dir %s/models)\n' "$STATEDIR" "$PREFIX"
own 0640 "root:$USER_NAME" "$target"

# 5. state dir -----------------------------------------------------------------------
say "data dir $STATEDIR"
run mkdir -p "$DESTDIR$STATEDIR"
own 0750 "$USER_NAME:$USER_NAME" "$DESTDIR$STATEDIR"

# 6. unit -------------------------------------------------------------------------------
say "unit $UNITDIR/dicom-node.service"
run mkdir -p "$DESTDIR$UNITDIR"
run install -m 0644 "$SRC/systemd/dicom-node.service" "$DESTDIR$UNITDIR/dicom-node.service"
if [ "$GPU" = yes ]; then
  say "GPU drop-in $UNITDIR/dicom-node.service.d/gpu.conf"
  run mkdir -p "$DESTDIR$UNITDIR/dicom-node.service.d"
  run install -m 0644 "$SRC/systemd/gpu.conf" "$DESTDIR$UNITDIR/dicom-node.service.d/gpu.conf"
else
  run rm -f "$DESTDIR$UNITDIR/dicom-node.service.d/gpu.conf"
fi

# 7. check and enable ---------------------------------------------------------------------
if [ -n "$DESTDIR" ]; then
  say "installed under $DESTDIR; not enabling (check with: systemd-analyze verify --root=$DESTDIR ...)"
  exit 0
fi
say "checks"
run systemd-analyze verify "$UNITDIR/dicom-node.service"
if [ "$DRY" = no ]; then
  # As the service user: it must be able to read the config and write the data dir.
  if command -v runuser >/dev/null 2>&1; then
    runuser -u "$USER_NAME" -- "$PREFIX/.venv/bin/dicom-node" -c "$CONFDIR/node.yaml" check-config
  else
    "$PREFIX/.venv/bin/dicom-node" -c "$CONFDIR/node.yaml" check-config
  fi
fi
if [ "$ENABLE" = yes ] && [ -d /run/systemd/system ]; then
  say "enable and start"
  run systemctl daemon-reload
  run systemctl enable --now dicom-node.service
  echo "    status: systemctl status dicom-node; logs: journalctl -u dicom-node -f"
  echo "    status page: http://127.0.0.1:9109/ (node.http in $CONFDIR/node.yaml)"
else
  say "not enabled (--no-enable, or systemd is not PID 1): systemctl enable --now dicom-node"
fi
