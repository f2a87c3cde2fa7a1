//! The `serve` settings: every flag has an environment variable (`VMRW_…`).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::vmop::power::PowerPolicy;

fn power_policy(value: &str) -> Result<PowerPolicy, String> {
    PowerPolicy::parse(value)
}

/// What to do with a VM whose VirtualMachineGroup does not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum GroupPolicy {
    /// Hold the create until the group appears, up to the wait bound; then deny.
    #[default]
    WaitThenDeny,
    /// Deny at once.
    Deny,
    /// Admit the VM with a warning.
    AllowWithWarning,
}

impl GroupPolicy {
    pub fn parse(value: &str) -> Result<GroupPolicy, String> {
        <GroupPolicy as ValueEnum>::from_str(value, true).map_err(|_| {
            format!(
                "unknown group policy {value:?} (use wait-then-deny, deny or allow-with-warning)"
            )
        })
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            GroupPolicy::WaitThenDeny => "wait-then-deny",
            GroupPolicy::Deny => "deny",
            GroupPolicy::AllowWithWarning => "allow-with-warning",
        }
    }
}

/// What to do with a restored VM when its Velero Restore cannot be read in
/// time (RBAC, API server trouble): it might be a copy beside its original.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum RestoreUnreadable {
    /// Deny, naming the error: fail closed.
    #[default]
    Deny,
    /// Admit with the original's guest identity (MACs, addresses, BIOS UUID) and a warning.
    KeepIdentity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

/// Settings of the review itself, shared by `serve` and `review`.
#[derive(Debug, Clone, Args)]
pub struct RuleArgs {
    /// What to do with a VM whose group does not exist.
    #[arg(long, env = "VMRW_GROUP_POLICY", value_enum, default_value_t = GroupPolicy::WaitThenDeny)]
    pub group_policy: GroupPolicy,

    /// How long a VM's create may wait for its group (e.g. 20s). Kept under
    /// the `?timeout=` the API server sends, minus --timeout-margin.
    #[arg(long, env = "VMRW_GROUP_WAIT_TIMEOUT", value_parser = humantime_duration, default_value = "20s")]
    pub group_wait_timeout: Duration,

    /// Time kept free before the API server's deadline to answer in.
    #[arg(long, env = "VMRW_TIMEOUT_MARGIN", value_parser = humantime_duration, default_value = "2s")]
    pub timeout_margin: Duration,

    /// What to do with a VM whose Velero Restore cannot be read in time.
    #[arg(long, env = "VMRW_RESTORE_UNREADABLE", value_enum, default_value_t = RestoreUnreadable::Deny)]
    pub restore_unreadable: RestoreUnreadable,

    /// Power of restored groups and VMs, when the Restore does not choose one
    /// (annotation velero-vm-restore-webhook/power-policy): boot-order holds
    /// group trees with a boot order until the restore has finished, off
    /// leaves everything PoweredOff, as-backed-up keeps the backup's states.
    #[arg(long, env = "VMRW_POWER_POLICY", value_parser = power_policy, default_value = "boot-order")]
    pub power_policy: PowerPolicy,

    /// Rule ids to turn off (repeat, or comma-separate in the variable).
    #[arg(
        long = "disable-rule",
        env = "VMRW_DISABLE_RULES",
        value_delimiter = ','
    )]
    pub disabled_rules: Vec<String>,
}

impl RuleArgs {
    pub fn disabled_rule_set(&self) -> Result<BTreeSet<String>, String> {
        let known: BTreeSet<&str> = crate::vmop::rule_docs().iter().map(|doc| doc.id).collect();
        let mut set = BTreeSet::new();
        for rule in self
            .disabled_rules
            .iter()
            .map(|r| r.trim())
            .filter(|r| !r.is_empty())
        {
            if !known.contains(rule) {
                return Err(format!(
                    "unknown rule {rule:?} in --disable-rule; known rules: {}",
                    known.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
            set.insert(rule.to_string());
        }
        Ok(set)
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// PEM certificate chain served on --listen. Reloaded when it changes.
    #[arg(long, env = "VMRW_TLS_CERT_FILE")]
    pub tls_cert_file: PathBuf,

    /// PEM private key for --tls-cert-file.
    #[arg(long, env = "VMRW_TLS_KEY_FILE")]
    pub tls_key_file: PathBuf,

    /// PEM CA certificate(s): when given, every HTTPS client must present a
    /// certificate signed by one of them. Configure the API server to present
    /// one to this webhook (an AdmissionConfiguration with a kubeConfigFile),
    /// so that nothing but the API server can ask /mutate anything.
    #[arg(long, env = "VMRW_CLIENT_CA_FILE")]
    pub client_ca_file: Option<PathBuf>,

    /// HTTPS address for /mutate, /healthz and /readyz.
    #[arg(long, env = "VMRW_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,

    /// Plain-HTTP address for /metrics (and /healthz, /readyz).
    #[arg(long, env = "VMRW_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,

    /// How often the certificate files are read and compared.
    #[arg(long, env = "VMRW_TLS_RELOAD_INTERVAL", value_parser = humantime_duration, default_value = "5s")]
    pub tls_reload_interval: Duration,

    /// Namespace of Velero's Restore objects.
    #[arg(long, env = "VMRW_VELERO_NAMESPACE", default_value = "velero")]
    pub velero_namespace: String,

    /// Velero's identity, by user name (`request.userInfo.username`; repeat,
    /// or comma-separate in the variable), besides --velero-group: only its
    /// updates are reviewed (the backed-up status it writes after a create,
    /// and objects it updates with --existing-resource-policy=update), and a
    /// labelled create from anyone else is warned about. Default: none.
    #[arg(long = "velero-user", env = "VMRW_VELERO_USERS", value_delimiter = ',')]
    pub velero_users: Vec<String>,

    /// Velero's identity, by group (any of `request.userInfo.groups`;
    /// repeat, or comma-separate in the variable). Default: every
    /// ServiceAccount of --velero-namespace,
    /// system:serviceaccounts:NAMESPACE, which is Velero however it was
    /// installed (`velero install` names its ServiceAccount `velero`,
    /// Velero's Helm chart `velero-server`).
    #[arg(
        long = "velero-group",
        env = "VMRW_VELERO_GROUPS",
        value_delimiter = ','
    )]
    pub velero_groups: Vec<String>,

    /// Users never taken for Velero, even as members of a --velero-group
    /// (repeat, or comma-separate in the variable): the webhook's own
    /// ServiceAccount, which the chart sets, since its companion patches
    /// restored groups and, installed in Velero's namespace, it is in
    /// Velero's group. Default: none.
    #[arg(
        long = "not-velero-user",
        env = "VMRW_NOT_VELERO_USERS",
        value_delimiter = ','
    )]
    pub not_velero_users: Vec<String>,

    /// VM Operator's own namespace, where it records which storage policies
    /// encrypt (StoragePolicy objects): read to check a VM's encryption
    /// class against its storage class.
    #[arg(
        long,
        env = "VMRW_VM_OPERATOR_NAMESPACE",
        default_value = "vmware-system-vmop"
    )]
    pub vm_operator_namespace: String,

    /// Largest request body accepted, in bytes. The default (1.5 MiB) is
    /// etcd's default request limit, so no storable object is refused.
    #[arg(long, env = "VMRW_MAX_BODY_BYTES", default_value_t = 1536 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=64 * 1024 * 1024))]
    pub max_body_bytes: u64,

    /// Time allowed for a client to send a request's headers, from its
    /// first byte (or from the connection's start).
    #[arg(long, env = "VMRW_HEADER_READ_TIMEOUT", value_parser = humantime_duration, default_value = "10s")]
    pub header_read_timeout: Duration,

    /// A kept-alive connection without a request is closed after this. Keep
    /// it above the API server's 90 s idle timeout for webhook connections,
    /// so the API server closes first and never sends a request on a
    /// connection being closed.
    #[arg(long, env = "VMRW_IDLE_TIMEOUT", value_parser = humantime_duration, default_value = "120s")]
    pub idle_timeout: Duration,

    /// Time allowed for the TLS handshake and for reading a request body.
    #[arg(long, env = "VMRW_REQUEST_READ_TIMEOUT", value_parser = humantime_duration, default_value = "10s")]
    pub request_read_timeout: Duration,

    /// Reviews in progress at once, from reading the body to answering; more
    /// wait for a slot until their deadline. Bounds memory: at most this many
    /// bodies of --max-body-bytes are held (group waits not included).
    #[arg(long, env = "VMRW_MAX_CONCURRENT_REVIEWS", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_concurrent_reviews: u32,

    /// Request bytes buffered at once over all reviews in progress: a review
    /// takes its Content-Length from this budget before its body is read, so
    /// a few huge bodies cannot exhaust memory (parsing one costs a multiple
    /// of its size). At least --max-body-bytes.
    #[arg(long, env = "VMRW_MAX_BUFFERED_BYTES", default_value_t = 8 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=1024 * 1024 * 1024))]
    pub max_buffered_bytes: u64,

    /// Open connections at once, on each port; further connections wait in
    /// the listen backlog.
    #[arg(long, env = "VMRW_MAX_CONNECTIONS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,

    /// Open connections from one source address, on each port; more are
    /// refused at once. One pod cannot take the connections the API server
    /// needs.
    #[arg(long, env = "VMRW_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections_per_source: u32,

    /// Addresses the API server calls the webhook from, as CIDRs (a bare
    /// address is one host; repeat, or comma-separate in the variable):
    /// their connections count only against --max-connections, never against
    /// --max-connections-per-source, and their reviews only against the whole
    /// byte budget, not one source's share of it. With --client-ca-file,
    /// every connection that presents a certificate it signed is treated so
    /// too. The chart passes the API server's addresses it finds or is given
    /// (networkPolicy.apiServer).
    #[arg(long = "api-server-cidr", env = "VMRW_API_SERVER_CIDRS", value_delimiter = ',',
          value_parser = Cidr::parse)]
    pub api_server_cidrs: Vec<Cidr>,

    /// VMs waiting for their VirtualMachineGroup at once, over all namespaces.
    /// A VM beyond it is not held: its group is checked once.
    #[arg(long, env = "VMRW_MAX_GROUP_WAITS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_group_waits: u32,

    /// VMs waiting for groups at once in one namespace. Velero restores one
    /// item at a time, so a restore holds one wait; a namespace that holds
    /// more is creating VMs by hand, and cannot take the waits other
    /// namespaces' restores need.
    #[arg(long, env = "VMRW_MAX_GROUP_WAITS_PER_NAMESPACE", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_group_waits_per_namespace: u32,

    /// After a wait for a group ran out, later VMs naming that group are
    /// answered at once for this long (0s: always wait).
    #[arg(long, env = "VMRW_GROUP_MISS_MEMORY", value_parser = humantime_duration, default_value = "30s")]
    pub group_miss_memory: Duration,

    /// On SIGTERM, how long the server keeps serving with /readyz failing,
    /// so that endpoints stop routing to it before it stops accepting.
    #[arg(long, env = "VMRW_SHUTDOWN_DRAIN_DELAY", value_parser = humantime_duration, default_value = "5s")]
    pub shutdown_drain_delay: Duration,

    /// After the drain delay, how long in-flight reviews may take to finish.
    #[arg(long, env = "VMRW_SHUTDOWN_TIMEOUT", value_parser = humantime_duration, default_value = "30s")]
    pub shutdown_timeout: Duration,

    /// Serve POST /noop (reads the body, allows the request unchanged) and
    /// POST /noop-patch (the same with a fixed one-label patch): the baseline
    /// routes of the benchmarks. Off in production.
    #[arg(long, env = "VMRW_BENCH_NOOP_ROUTE", default_value_t = false)]
    pub bench_noop_route: bool,

    /// Run without a cluster: only the groups given with --group exist, and
    /// no Velero Restore is found. For benchmarks and local trials only.
    #[arg(long, env = "VMRW_NO_KUBE", default_value_t = false)]
    pub no_kube: bool,

    /// With --no-kube: a VirtualMachineGroup that exists, as NAMESPACE/NAME
    /// (repeatable).
    #[arg(long = "group", value_name = "NAMESPACE/NAME", requires = "no_kube")]
    pub groups: Vec<String>,

    #[command(flatten)]
    pub rules: RuleArgs,

    #[command(flatten)]
    pub companion: CompanionArgs,
}

/// The restore companion: what it does once a Restore has finished.
#[derive(Debug, Clone, Args)]
pub struct CompanionArgs {
    /// Turn the restore companion off (no boot-order start, no pruning, no
    /// report Events). Held groups then stay without a power state.
    #[arg(
        long = "no-companion",
        env = "VMRW_NO_COMPANION",
        default_value_t = false
    )]
    pub disabled: bool,

    /// Prune members missing from a restored group's boot order, unless the
    /// Restore says otherwise (annotation
    /// velero-vm-restore-webhook/prune-missing-members).
    #[arg(long, env = "VMRW_PRUNE_MISSING_MEMBERS", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub prune_missing_members: bool,

    /// Restores that finished longer ago than this are not acted on (at
    /// start-up, the companion sees every Restore Velero keeps).
    #[arg(long, env = "VMRW_COMPANION_MAX_AGE", value_parser = humantime_duration, default_value = "24h")]
    pub max_age: Duration,

    /// How long after a Restore finished a group with a boot order waits for
    /// VM Operator to finish creating its members before the companion
    /// starts it anyway (with a Warning Event): a member created after its
    /// power-on time boots late.
    #[arg(long, env = "VMRW_COMPANION_START_WAIT", value_parser = humantime_duration, default_value = "5m")]
    pub start_wait: Duration,

    /// How long after a failed step (an API error) the companion tries a
    /// Restore again.
    #[arg(long, env = "VMRW_COMPANION_RETRY", value_parser = humantime_duration, default_value = "10s")]
    pub retry: Duration,
}

/// An address range, `10.0.0.0/28` or `fd00::/120`; a bare address is one
/// host. An IPv4 address seen as IPv4-mapped IPv6 (`::ffff:10.0.0.1`, from a
/// dual-stack listener) is matched as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an address or CIDR like 10.0.0.0/28"))?;
        let address = address.to_canonical();
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|prefix| *prefix <= bits)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {bits}"))?,
        };
        Ok(Cidr {
            network: address,
            prefix,
        })
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(network) & mask == u32::from(address) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(network) & mask == u128::from(address) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The longest duration any setting takes: larger values are refused, so
/// that no deadline arithmetic can overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Parses `250ms`, `20s`, `1m` (at most a week). Never panics.
pub fn humantime_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|at| text.split_at(at))
        .unwrap_or((text, "s"));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 250ms, 20s or 1m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?}: unit must be ms, s, m or h")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{text:?} is not a valid duration"));
    }
    match Duration::try_from_secs_f64(seconds) {
        Ok(duration) if duration <= MAX_DURATION => Ok(duration),
        _ => Err(format!("{text:?} is longer than a week")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            humantime_duration("250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(humantime_duration("20s").unwrap(), Duration::from_secs(20));
        assert_eq!(humantime_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(humantime_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(humantime_duration("soon").is_err());
        assert!(humantime_duration("5d").is_err());
        // Huge values are refused, not a panic.
        assert!(humantime_duration("99999999999999999999s").is_err());
        assert!(humantime_duration("1e300h").is_err());
        assert!(humantime_duration("8d").is_err());
        assert_eq!(humantime_duration("168h").unwrap(), MAX_DURATION);
    }

    #[test]
    fn cidrs() {
        let range = Cidr::parse("10.0.0.0/28").unwrap();
        assert!(range.contains("10.0.0.15".parse().unwrap()));
        assert!(!range.contains("10.0.0.16".parse().unwrap()));
        // A dual-stack listener sees IPv4 clients as IPv4-mapped IPv6.
        assert!(range.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!range.contains("fd00::1".parse().unwrap()));
        let host = Cidr::parse("192.0.2.10").unwrap();
        assert_eq!(host.to_string(), "192.0.2.10/32");
        assert!(host.contains("192.0.2.10".parse().unwrap()));
        assert!(!host.contains("192.0.2.11".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/120").unwrap();
        assert!(v6.contains("fd00::ff".parse().unwrap()));
        assert!(!v6.contains("fd00::100".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("203.0.113.1".parse().unwrap())
        );
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "nope",
            "10.0.0.0/x",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn group_policy_parses() {
        assert_eq!(GroupPolicy::parse("deny").unwrap(), GroupPolicy::Deny);
        assert_eq!(
            GroupPolicy::parse("allow-with-warning").unwrap(),
            GroupPolicy::AllowWithWarning
        );
        assert!(GroupPolicy::parse("maybe").is_err());
    }

    #[test]
    fn unknown_disabled_rule_is_rejected() {
        let args = RuleArgs {
            group_policy: GroupPolicy::WaitThenDeny,
            group_wait_timeout: Duration::from_secs(1),
            timeout_margin: Duration::from_secs(1),
            restore_unreadable: RestoreUnreadable::Deny,
            power_policy: PowerPolicy::BootOrder,
            disabled_rules: vec!["vm-instance-uuid".into(), "nope".into()],
        };
        assert!(args.disabled_rule_set().unwrap_err().contains("nope"));
    }
}
