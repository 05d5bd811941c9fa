# ---- Shared by the deb and rpm maintainer scripts (inserted by scripts/build-packages). ----

# True when systemd is the running init: false in a chroot, an image build or a container
# without systemd, where only offline operations (enable, disable) make sense.
vibectld_systemd_running() {
    [ -d /run/systemd/system ]
}

# Creates the vibectld user and the vibectld and vibectld-admin groups, as
# /usr/lib/sysusers.d/vibectld.conf describes them. Idempotent.
vibectld_create_users() {
    if command -v systemd-sysusers >/dev/null 2>&1; then
        vibectld_sysusers
        return
    fi
    # No systemd-sysusers (a minimal image): the same with the shadow tools.
    getent group vibectld-admin >/dev/null 2>&1 || groupadd --system vibectld-admin
    getent group vibectld >/dev/null 2>&1 || groupadd --system vibectld
    if ! getent passwd vibectld >/dev/null 2>&1; then
        useradd --system --gid vibectld --home-dir /var/lib/vibectld --no-create-home \
            --shell /usr/sbin/nologin --comment "vibectl LLM proxy daemon" vibectld
    fi
    case " $(id -Gn vibectld) " in
        *" vibectld-admin "*) ;;
        *) usermod --append --groups vibectld-admin vibectld ;;
    esac
}
# ---- End of the shared part. ----
