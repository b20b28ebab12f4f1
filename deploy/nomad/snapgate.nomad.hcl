# snapgate on Nomad: one gateway per client node (a system job), in
# cluster mode, its catalog in an etcd the operator runs (see
# deploy/kubernetes/etcd.yaml for the shape of one).
#
# Driver: raw_exec. The gateway creates taps, routes and an nftables table
# in the node's network, writes /proc/sys/net, opens /dev/kvm and
# /dev/net/tun, and jails each VMM (namespaces, uids, cgroups): it needs
# what dist/snapgate.service grants (six capabilities, the two devices, a
# cgroup subtree of its own). The exec driver cannot give it that: it runs
# a task in a chroot behind a device cgroup that cannot be told to allow
# /dev/kvm, and its capability allow-list leaves SYS_ADMIN out by default.
# raw_exec runs the binary unisolated as the client's user (root), which
# holds all of it; the VMMs are jailed by snapgate itself. On cgroup v2,
# Nomad runs the task in a cgroup of its own, under which snapgate puts its
# VMMs' cgroups as it does under systemd's Delegate= (the raw_exec option
# cgroup_v2_override can name another).
#
# Each client needs:
#   - raw_exec enabled: plugin "raw_exec" { config { enabled = true } }
#   - /usr/local/bin/snapgate, a VMM, nftables, conntrack and the guests'
#     files (here /usr/share/snapgate/guest)
#   - hardware KVM (/dev/kvm): vmm.accel is kvm
#   - a client max_kill_timeout (default 30s) of at least 45s, the
#     kill_timeout below
# The shared secrets live in Nomad variables, readable by this job's tasks:
#   nomad var put nomad/jobs/snapgate \
#     cluster_secret="$(openssl rand -hex 32)" admin_token="$(openssl rand -hex 32)"
#
# Checked by scripts/validate-deploy (parsed as HCL2).
job "snapgate" {
  type        = "system"
  datacenters = ["*"]

  constraint {
    attribute = "${attr.kernel.name}"
    value     = "linux"
  }

  constraint {
    attribute = "${attr.cpu.arch}"
    value     = "amd64"
  }

  # One node at a time: a node's gateway is down while it restarts (two
  # gateways on one node would share its ports, tap prefix and fence).
  update {
    max_parallel = 1
    stagger      = "30s"
  }

  group "snapgate" {
    # The node's own ports (raw_exec shares the host's network).
    network {
      port "http" {
        static = 8080
      }
      port "admin" {
        static = 9090
      }
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "10s"
      mode     = "delay"
    }

    # The probes need no token. /readyz: 503 until every app's min_warm is
    # met (or failed with a reason), then 200; a node that lost etcd stays
    # 200 ("degraded") and routes from the catalog it last saw.
    service {
      name     = "snapgate"
      provider = "nomad"
      port     = "http"

      check {
        name     = "readyz"
        type     = "http"
        port     = "admin"
        path     = "/readyz"
        interval = "10s"
        timeout  = "3s"
      }
    }

    service {
      name     = "snapgate-admin"
      provider = "nomad"
      port     = "admin"

      check {
        name     = "livez"
        type     = "http"
        path     = "/livez"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "snapgate" {
      driver = "raw_exec"

      config {
        command = "/usr/local/bin/snapgate"
        args    = ["run", "--config", "${NOMAD_TASK_DIR}/proxy.yaml"]
      }

      # SIGTERM: the node's catalog entry is revoked (up to 2s), requests
      # in flight finish within shutdown_grace (20s), then pools, runtime
      # stocks and jails get up to 5s each. kill_timeout leaves room for
      # all of it.
      kill_signal  = "SIGTERM"
      kill_timeout = "45s"

      # The VMMs' cgroups nest under the task's where Nomad gives it one:
      # memory is sized for the VMs (sum over apps of max_instances x
      # (memory_mib + vmm.jail.memory_overhead_mib)) and the gateway.
      resources {
        cpu    = 1000
        memory = 4096
      }

      # The config. node: the Nomad node's name made a DNS label (lower
      # case, dots and underscores to dashes; at most 63 characters, which
      # the name must fit); advertise: the node's address, where peers
      # reach listen. SIGHUP reloads what reloads (apps, pools); listen,
      # admin, cluster and the like take a restart.
      template {
        destination   = "local/proxy.yaml"
        change_mode   = "signal"
        change_signal = "SIGHUP"
        data          = <<-EOT
          listen: 0.0.0.0:{{ env "NOMAD_PORT_http" }}
          admin: {{ env "attr.unique.network.ip-address" }}:{{ env "NOMAD_PORT_admin" }}
          # Relative paths are relative to this file (local/).
          admin_token_file: ../secrets/admin.token
          shutdown_grace: 20s
          state_dir: /var/lib/snapgate
          vmm:
            kind: qemu
            accel: kvm
          network:
            tap_prefix: sgtap
            fence: true
          cluster:
            node: {{ env "node.unique.name" | toLower | replaceAll "." "-" | replaceAll "_" "-" }}
            advertise: {{ env "attr.unique.network.ip-address" }}:{{ env "NOMAD_PORT_http" }}
            secret_file: ../secrets/cluster.secret
            etcd:
              # The operator's etcd members.
              endpoints:
                - http://etcd-0.example.internal:2379
                - http://etcd-1.example.internal:2379
                - http://etcd-2.example.internal:2379
              prefix: /snapgate/
            lease_ttl: 10s
            publish_interval: 250ms
            peer_connect_timeout: 1s
          apps:
            hello:
              hosts: [hello.example.com]
              image:
                kernel: /usr/share/snapgate/guest/vmlinuz
                initramfs: /usr/share/snapgate/guest/initramfs.cpio.gz
                cmdline: >-
                  console=ttyS0 quiet panic=-1 cryptomgr.notests
                  ip={guest_ip}::{host_ip}:{netmask}::eth0:off snapgate.port={guest_port}
                memory_mib: 256
                guest_port: 8080
                ready_path: /healthz
              pool:
                min_warm: 0
                max_instances: 4
        EOT
      }

      # The hop marker's shared secret (the same on every node) and the
      # admin listener's token, off loopback. Both are read at start.
      template {
        destination = "secrets/cluster.secret"
        perms       = "0400"
        change_mode = "restart"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/snapgate" }}{{ .cluster_secret }}{{ end }}
        EOT
      }

      template {
        destination = "secrets/admin.token"
        perms       = "0400"
        change_mode = "restart"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/snapgate" }}{{ .admin_token }}{{ end }}
        EOT
      }
    }
  }
}
