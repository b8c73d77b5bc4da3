# gitops-mesh image: the agent (`gitops-mesh node`), the console (`gitops-mesh console`) and the
# demo git server (deploy/compose/git-server.sh) all run from it. See docker-compose.yml.
FROM python:3.11-slim

# git: the agent fetches the spec repo with it; tini is provided by compose (`init: true`).
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY reconciler ./reconciler
COPY console ./console
COPY specs-example ./specs-example
RUN pip install -c constraints.txt . \
 && mkdir -p /usr/share/gitops-mesh \
 && cp -r specs-example /usr/share/gitops-mesh/specs-example \
 && rm -rf /src

COPY deploy/compose/git-server.sh /usr/local/bin/gitops-mesh-git-server

# Apps run as the same unprivileged user as the agent that starts them.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/gitops gitops \
 && install -d -o gitops -g gitops /var/lib/gitops-mesh /srv/git
USER gitops
WORKDIR /var/lib/gitops-mesh
VOLUME ["/var/lib/gitops-mesh"]

ENTRYPOINT ["gitops-mesh"]
CMD ["--help"]
