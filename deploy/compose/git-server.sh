#!/bin/sh
# Demo spec-repo server for docker-compose: seeds a bare repo from specs-example on first start,
# installs the post-receive notify hook, and serves it with `git daemon` (pushes allowed).
# Unauthenticated git:// push is for a local demo only: use your git host in production.
set -eu
base=${GITOPS_MESH_GIT_BASE:-/srv/git}
port=${GITOPS_MESH_GIT_PORT:-9418}
repo="$base/specs.git"
seed=${GITOPS_MESH_SEED:-/usr/share/gitops-mesh/specs-example}

if [ ! -d "$repo" ]; then
  work=$(mktemp -d)
  cp -r "$seed/." "$work/"
  git -C "$work" init -q -b main
  git -C "$work" add -A
  git -C "$work" -c user.name=gitops-mesh -c user.email=demo@gitops-mesh.invalid \
    commit -q -m "specs from specs-example"
  git clone -q --bare "$work" "$repo"
  rm -rf "$work"
fi

# The hook announces every push on gitops.source.changed (needs GITOPS_MESH_NATS).
hook=$(python -c 'import pathlib, reconciler; print(pathlib.Path(reconciler.__file__).parent / "hooks" / "post-receive")')
if [ -f "$hook" ]; then
  cp "$hook" "$repo/hooks/post-receive"
  chmod +x "$repo/hooks/post-receive"
fi

exec git daemon --reuseaddr --base-path="$base" --export-all --enable=receive-pack \
  --informative-errors --listen=${GITOPS_MESH_GIT_LISTEN:-0.0.0.0} --port="$port" "$base"
