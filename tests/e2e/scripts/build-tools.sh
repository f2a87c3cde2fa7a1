#!/usr/bin/env bash
# Builds the e2e test infrastructure (never part of the product) from the Go
# module proxy into a cache outside the repo, keyed by the pinned versions
# (the hash of each tools module's go.mod/go.sum), so only the first run pays.
# Prints the directory holding the binaries on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache_root=${E2E_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/velero-vm-restore-webhook-e2e}
export GOFLAGS=${GOFLAGS:--buildvcs=false}
export CGO_ENABLED=0

# build MODULE_DIR OUT_NAME PACKAGE [ldflags [LINK_NAME]]
# The binary is linked into bin/ as LINK_NAME (default OUT_NAME).
build() {
  local mod=$1 name=$2 pkg=$3 ldflags=${4:-} link=${5:-$2}
  local key
  key=$( (cat "$here/tools/$mod/go.mod" "$here/tools/$mod/go.sum"; find "$here/tools/$mod" -name '*.go' -print0 | sort -z | xargs -0 cat; echo "$pkg $ldflags") | sha256sum | cut -c1-16)
  local out="$cache_root/$mod-$key/$name"
  if [[ -x $out ]]; then
    echo "e2e tools: $name cached ($out)" >&2
  else
    mkdir -p "$(dirname "$out")"
    echo "e2e tools: building $name from $pkg (module tools/$mod) ..." >&2
    local start=$SECONDS
    (cd "$here/tools/$mod" && go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp" "$pkg")
    mv "$out.tmp" "$out"
    echo "e2e tools: built $name in $((SECONDS - start))s" >&2
  fi
  mkdir -p "$cache_root/bin"
  built=$out
  ln -sf "$out" "$cache_root/bin/$link"
  # A run's own links (E2E_BIN_DIR): another worktree's build relinks the
  # shared ones to its builds, which must not swap a running test's binaries.
  if [[ -n ${E2E_BIN_DIR:-} ]]; then mkdir -p "$E2E_BIN_DIR" && ln -sfn "$out" "$E2E_BIN_DIR/$link"; fi
}

want=${*:-all}
has() { [[ $want == all ]] || [[ " $want " == *" $1 "* ]]; }

kube_ver='-X k8s.io/component-base/version.gitVersion=v1.34.4 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=34'
has etcd && build kube etcd ./cmd/etcd
has kube-apiserver && build kube kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kube_ver"
has kube-controller-manager && build kube kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$kube_ver"
has kubectl && build kube kubectl k8s.io/kubernetes/cmd/kubectl "$kube_ver"
# The one-node cluster mode (test_cluster.py): kubelet, kube-scheduler and
# kube-proxy at kube-apiserver's version, the pause program and the plugin
# image's cp. Their own module, so adding them left the control plane's key alone.
if [[ -d $here/tools/node ]]; then
  has kubelet && build node kubelet k8s.io/kubernetes/cmd/kubelet "$kube_ver"
  has kube-scheduler && build node kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$kube_ver"
  has kube-proxy && build node kube-proxy k8s.io/kubernetes/cmd/kube-proxy "$kube_ver"
  has pause && build node pause ./cmd/pause
  has cp && build node cp ./cmd/cp
fi
# A real NetworkPolicy enforcer for the cluster mode: kube-router's network
# policy controller (iptables and ipset; the kernel here lacks nftables'
# queue expression, which kube-network-policies needs), and the probe
# program the NetworkPolicy scenarios run in pods.
if [[ -d $here/tools/netpol ]]; then
  kr_ver='-X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=v2.1.0'
  has kube-router && build netpol kube-router github.com/cloudnativelabs/kube-router/v2/cmd/kube-router "$kr_ver"
fi
[[ -d $here/tools/probe ]] && { has probe && build probe probe ./cmd/probe; }
# cert-manager for the cluster mode's certManager scenarios: its controller,
# webhook and CA injector (thin mains around cert-manager's packages: the
# proxy serves no command module of it). Their images are written by
# images.py; the CRDs and manifests come from cert-manager's own Helm chart
# in the module (deploy/charts/cert-manager), installed with our helm.
if [[ -d $here/tools/certmanager ]]; then
  cm_ver='-X github.com/cert-manager/cert-manager/pkg/util.AppVersion=v1.21.2'
  has cert-manager-controller && build certmanager cert-manager-controller ./cmd/controller "$cm_ver"
  has cert-manager-webhook && build certmanager cert-manager-webhook ./cmd/webhook "$cm_ver"
  has cert-manager-cainjector && build certmanager cert-manager-cainjector ./cmd/cainjector "$cm_ver"
fi
# Velero: VELERO_VERSION (default 1.18.3, what CI runs) picks the tools module
# that requires exactly that version: tools/velero (1.18.3, with the AWS
# plugin) or tools/velero-X.Y (an older minor, cmd/velero only). The server
# and CLI are linked as bin/velero-X.Y.Z, so runs of different versions share
# the cache; bin/velero stays the 1.18.3 build. The AWS plugin (v1.14.3) is
# the same for every version: the plugin protocol did not change from 1.15.2
# to 1.18.3.
velero_version=${VELERO_VERSION:-1.18.3}
velero_version=${velero_version#v}
velero_module=
for dir in "$here"/tools/velero "$here"/tools/velero-*; do
  [[ -f $dir/go.mod ]] || continue
  if grep -Eq "(^|[[:space:]])github\.com/vmware-tanzu/velero v${velero_version//./\\.}([[:space:]]|$)" "$dir/go.mod"; then
    velero_module=$(basename "$dir")
    break
  fi
done
if has velero; then
  if [[ -z $velero_module ]]; then
    pinned=$(grep -Eho '(^|[[:space:]])github\.com/vmware-tanzu/velero v[0-9.]+' "$here"/tools/velero*/go.mod | awk '{print $2}' | sort -V | paste -sd' ')
    echo "e2e tools: no tools module pins Velero $velero_version (VELERO_VERSION); pinned: ${pinned}" >&2
    exit 2
  fi
  build "$velero_module" velero github.com/vmware-tanzu/velero/cmd/velero \
    "-X github.com/vmware-tanzu/velero/pkg/buildinfo.Version=v$velero_version" "velero-$velero_version"
  if [[ $velero_version == 1.18.3 ]]; then
    ln -sf "$built" "$cache_root/bin/velero"
    if [[ -n ${E2E_BIN_DIR:-} ]]; then ln -sfn "$built" "$E2E_BIN_DIR/velero"; fi
  fi
fi
if [[ -d $here/tools/velero ]]; then
  has velero-plugin-for-aws && build velero velero-plugin-for-aws github.com/vmware-tanzu/velero-plugin-for-aws/velero-plugin-for-aws
fi
[[ -d $here/tools/s3 ]] && { has s3server && build s3 s3server ./cmd/s3server; }
if [[ -d $here/tools/vmop ]] && { has vmop-host || has vcsim-e2e; }; then
  # VM Operator v1.10.0 needs a govmomi pseudo-version and nested modules the
  # module proxy here refuses; ../shared/goproxy serves exactly those (a user
  # with normal internet access gets them from proxy.golang.org).
  shared_proxy=
  for candidate in "${VMRW_SHARED_GOPROXY:-}" "$here/../../../../shared/goproxy" /work/shared/goproxy; do
    if [[ -n $candidate && -d $candidate ]]; then shared_proxy=$(cd "$candidate" && pwd); break; fi
  done
  vmop_proxy=$(go env GOPROXY)
  [[ -n $shared_proxy ]] && vmop_proxy="file://$shared_proxy,$vmop_proxy"
  # VM Operator's webhooks and controllers (its fake or its vSphere provider),
  # and vcsim, the stand-in for vCenter its vSphere provider deploys into
  # (test_vcenter.py). One module, so the second build reuses the first's packages.
  has vmop-host && GOPROXY=$vmop_proxy build vmop vmop-host ./cmd/vmop-host
  has vcsim-e2e && GOPROXY=$vmop_proxy build vmop vcsim-e2e ./cmd/vcsim-e2e
fi
# NSX Operator's VPC networking CRDs (SubnetSet, Subnet, ...), generated by
# controller-gen from NSX Operator's API types (the version VM Operator
# v1.10.0 requires): no module ships their YAML. test_vmop_5's site B serves
# SubnetSets, so the webhook's network check has something to check against.
if [[ -d $here/tools/crdgen ]] && has nsx-crds; then
  build crdgen controller-gen sigs.k8s.io/controller-tools/cmd/controller-gen
  crds="$(dirname "$(readlink -f "$cache_root/bin/controller-gen")")/nsx-crds"
  if [[ ! -f $crds/crd.nsx.vmware.com_subnetsets.yaml ]]; then
    rm -rf "$crds.tmp"
    (cd "$here/tools/crdgen" && "$cache_root/bin/controller-gen" crd \
      paths=github.com/vmware-tanzu/nsx-operator/pkg/apis/vpc/v1alpha1 output:crd:dir="$crds.tmp")
    mv "$crds.tmp" "$crds"
  fi
  ln -sfn "$crds" "$cache_root/bin/nsx-crds"
  if [[ -n ${E2E_BIN_DIR:-} ]]; then ln -sfn "$crds" "$E2E_BIN_DIR/nsx-crds"; fi
fi
# Kyverno's admission controller, for `make bench-peers` only: never part of
# `all` (CI does not build it); ask for it by name.
if [[ -d $here/tools/kyverno && " $want " == *" kyverno "* ]]; then
  build kyverno kyverno github.com/kyverno/kyverno/cmd/kyverno
fi
helm_ver='-X helm.sh/helm/v3/internal/version.version=v3.19.0 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=34'
[[ -d $here/tools/helm ]] && { has helm && build helm helm helm.sh/helm/v3/cmd/helm "$helm_ver"; }
echo "${E2E_BIN_DIR:-$cache_root/bin}"
