/* BPF-LSM programs: per-container confinement in the kernel's security hooks.
 *
 * Every hook first asks stk_policy_of(): a task outside the Stockade parent cgroup returns at
 * once (one helper call and one array lookup), so host processes pass untouched. A hook
 * returns 0 to allow and -EPERM to deny; in audit mode it logs and allows.
 *
 * Compiled by bcc against the running kernel's headers (the lab boots Debian's 6.1 and
 * backports' 6.12, whose headers bcc uses), loaded by the agent, each link pinned as
 * link_lsm_<hook>.
 */

/* bcc puts its own copy of uapi/linux/bpf.h in front of the kernel's (Debian 12's bcc 0.26 has
 * 6.1's), and newer kernels' include/linux/bpf.h takes sizeof of uapi structs that copy lacks
 * (bpf_rb_root and bpf_rb_node since 6.2, bpf_refcount since 6.4, bpf_wq since 6.10: "incomplete
 * type" on 6.12). Only those inline helpers use them, never a program here: point the kernel
 * headers at complete stand-ins, which also stays right with a bcc whose copy has them. */
#define bpf_rb_root stk_bpf_rb_root
#define bpf_rb_node stk_bpf_rb_node
#define bpf_refcount stk_bpf_refcount
#define bpf_wq stk_bpf_wq
struct stk_bpf_rb_root { unsigned long long opaque[2]; } __attribute__((aligned(8)));
struct stk_bpf_rb_node { unsigned long long opaque[4]; } __attribute__((aligned(8)));
struct stk_bpf_refcount { unsigned int opaque[1]; } __attribute__((aligned(4)));
struct stk_bpf_wq { unsigned long long opaque[2]; } __attribute__((aligned(8)));

#include <linux/errno.h>
#include <linux/fs.h>
#include <linux/binfmts.h>
#include <linux/mount.h>
#include <linux/sched.h>
#include <linux/cgroup-defs.h>
#include <linux/kernfs.h>
#include <linux/socket.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <net/sock.h>
#include "stockade.h"

#define STK_FMODE_READ  0x1
#define STK_FMODE_WRITE 0x2
#define STK_MNT_READONLY 0x40
#define STK_SB_RDONLY 0x1

static __always_inline int stk_verdict(struct stk_policy *p, u64 cgid, u32 hook, u32 arg0, u32 arg1)
{
    return stk_refuse(p, cgid, hook, arg0, arg1) ? -EPERM : 0;
}

/* Is cgroup CG the container's cgroup CGID or below it? (bounded walk up the parents) */
static __always_inline int stk_cgroup_under(struct cgroup *cg, u64 cgid)
{
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (!cg)
            return 0;
        struct kernfs_node *kn = 0;
        u64 id = 0;
        bpf_probe_read_kernel(&kn, sizeof(kn), &cg->kn);
        if (kn)
            bpf_probe_read_kernel(&id, sizeof(id), &kn->id);
        if (id == cgid)
            return 1;
        struct cgroup_subsys_state *parent = 0;
        bpf_probe_read_kernel(&parent, sizeof(parent), &cg->self.parent);
        cg = (struct cgroup *)parent;  /* self is cgroup's first member */
    }
    return 0;
}

static __always_inline int stk_task_under(struct task_struct *t, u64 cgid)
{
    struct css_set *cs = 0;
    struct cgroup *cg = 0;
    bpf_probe_read_kernel(&cs, sizeof(cs), &t->cgroups);
    if (!cs)
        return 0;
    bpf_probe_read_kernel(&cg, sizeof(cg), &cs->dfl_cgrp);
    return stk_cgroup_under(cg, cgid);
}

/* The rule for a file's inode in this container, if any. */
static __always_inline struct stk_file_rule *stk_file_rule(struct file *file, u64 cgid)
{
    struct inode *inode = 0;
    struct super_block *sb = 0;
    struct stk_file_key key = {};
    bpf_probe_read_kernel(&inode, sizeof(inode), &file->f_inode);
    if (!inode)
        return 0;
    bpf_probe_read_kernel(&key.ino, sizeof(key.ino), &inode->i_ino);
    bpf_probe_read_kernel(&sb, sizeof(sb), &inode->i_sb);
    if (sb)
        bpf_probe_read_kernel(&key.dev, sizeof(key.dev), &sb->s_dev);
    key.cgid = cgid;
    return stk_files.lookup(&key);
}

static __always_inline int stk_file_event(struct stk_policy *p, u64 cgid, u32 hook, struct file *file,
                                          u32 access)
{
    struct stk_event *e = stk_event_new(p, cgid, hook);
    if (e) {
        struct dentry *d = 0;
        bpf_probe_read_kernel(&d, sizeof(d), &file->f_path.dentry);
        if (d) {
            const unsigned char *name = 0;
            bpf_probe_read_kernel(&name, sizeof(name), &d->d_name.name);
            bpf_probe_read_kernel_str(e->object, sizeof(e->object), name);
        }
        e->arg0 = access;
        stk_event_send(e);
    }
    return p->mode == STK_MODE_AUDIT ? 0 : -EPERM;
}

LSM_PROBE(file_open, struct file *file)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p)
        return 0;
    struct stk_file_rule *r = stk_file_rule(file, cgid);
    if (!r)
        return 0;
    u32 fmode = 0, want = 0;
    bpf_probe_read_kernel(&fmode, sizeof(fmode), &file->f_mode);
    if (fmode & STK_FMODE_READ)
        want |= STK_ACC_READ;
    if (fmode & STK_FMODE_WRITE)
        want |= STK_ACC_WRITE;
    if (!(r->deny & want))
        return 0;
    return stk_file_event(p, cgid, STK_H_FILE_OPEN, file, want);
}

LSM_PROBE(bprm_check_security, struct linux_binprm *bprm)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p)
        return 0;
    struct file *file = 0;
    bpf_probe_read_kernel(&file, sizeof(file), &bprm->file);
    if (!file)
        return 0;
    struct stk_file_rule *r = stk_file_rule(file, cgid);
    int bad = r && (r->deny & STK_ACC_EXEC);
    if ((p->flags & STK_F_EXEC_ALLOWLIST) && !(r && (r->allow & STK_ACC_EXEC)))
        bad = 1;
    if (!bad && (p->flags & STK_F_NO_EXEC_WRITABLE)) {
        struct vfsmount *mnt = 0;
        int mnt_flags = 0;
        unsigned long sb_flags = 0;
        struct super_block *sb = 0;
        bpf_probe_read_kernel(&mnt, sizeof(mnt), &file->f_path.mnt);
        if (mnt) {
            bpf_probe_read_kernel(&mnt_flags, sizeof(mnt_flags), &mnt->mnt_flags);
            bpf_probe_read_kernel(&sb, sizeof(sb), &mnt->mnt_sb);
        }
        if (sb)
            bpf_probe_read_kernel(&sb_flags, sizeof(sb_flags), &sb->s_flags);
        if (!(mnt_flags & STK_MNT_READONLY) && !(sb_flags & STK_SB_RDONLY))
            bad = 1;
    }
    if (!bad)
        return 0;
    struct stk_event *e = stk_event_new(p, cgid, STK_H_BPRM_CHECK);
    if (e) {
        const char *name = 0;
        bpf_probe_read_kernel(&name, sizeof(name), &bprm->filename);
        bpf_probe_read_kernel_str(e->object, sizeof(e->object), name);
        stk_event_send(e);
    }
    return p->mode == STK_MODE_AUDIT ? 0 : -EPERM;
}

/* -- mounts: none once the container runs ---------------------------------------------------- */

static __always_inline int stk_mount_hook(u32 hook, const char *what)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p || !(p->flags & STK_F_DENY_MOUNT))
        return 0;
    struct stk_event *e = stk_event_new(p, cgid, hook);
    if (e) {
        if (what)
            bpf_probe_read_kernel_str(e->object, sizeof(e->object), what);
        stk_event_send(e);
    }
    return p->mode == STK_MODE_AUDIT ? 0 : -EPERM;
}

LSM_PROBE(sb_mount, const char *dev_name, const struct path *path, const char *type, unsigned long flags,
          void *data)
{
    return stk_mount_hook(STK_H_SB_MOUNT, type);
}

LSM_PROBE(move_mount, const struct path *from_path, const struct path *to_path)
{
    return stk_mount_hook(STK_H_MOVE_MOUNT, 0);
}

LSM_PROBE(sb_umount, struct vfsmount *mnt, int flags)
{
    return stk_mount_hook(STK_H_SB_UMOUNT, 0);
}

LSM_PROBE(sb_pivotroot, const struct path *old_path, const struct path *new_path)
{
    return stk_mount_hook(STK_H_SB_PIVOTROOT, 0);
}

/* -- processes: ptrace and signals stay inside the own cgroup subtree ------------------------- */

LSM_PROBE(ptrace_access_check, struct task_struct *child, unsigned int mode)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p || !(p->flags & STK_F_PTRACE_OWN) || stk_task_under(child, cgid))
        return 0;
    u32 pid = 0;
    bpf_probe_read_kernel(&pid, sizeof(pid), &child->tgid);
    return stk_verdict(p, cgid, STK_H_PTRACE, pid, mode);
}

LSM_PROBE(task_kill, struct task_struct *target, struct kernel_siginfo *info, int sig, const struct cred *cred)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p || !(p->flags & STK_F_KILL_OWN) || stk_task_under(target, cgid))
        return 0;
    u32 pid = 0;
    bpf_probe_read_kernel(&pid, sizeof(pid), &target->tgid);
    return stk_verdict(p, cgid, STK_H_TASK_KILL, pid, sig);
}

LSM_PROBE(userns_create, const struct cred *cred)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p || !(p->flags & STK_F_DENY_USERNS))
        return 0;
    return stk_verdict(p, cgid, STK_H_USERNS_CREATE, 0, 0);
}

/* -- kernel interfaces a container never needs ----------------------------------------------- */

LSM_PROBE(kernel_module_request, char *kmod_name)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p || !(p->flags & STK_F_DENY_MODULES))
        return 0;
    struct stk_event *e = stk_event_new(p, cgid, STK_H_MODULE_REQUEST);
    if (e) {
        bpf_probe_read_kernel_str(e->object, sizeof(e->object), kmod_name);
        stk_event_send(e);
    }
    return p->mode == STK_MODE_AUDIT ? 0 : -EPERM;
}

LSM_PROBE(kernel_read_file, struct file *file, enum kernel_read_file_id id, bool contents)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p || !(p->flags & STK_F_DENY_MODULES))
        return 0;
    return stk_verdict(p, cgid, STK_H_KERNEL_READ_FILE, id, 0);
}

LSM_PROBE(kernel_load_data, enum kernel_load_data_id id, bool contents)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p || !(p->flags & STK_F_DENY_MODULES))
        return 0;
    return stk_verdict(p, cgid, STK_H_KERNEL_LOAD_DATA, id, 0);
}

LSM_PROBE(bpf, int cmd, union bpf_attr *attr, unsigned int size)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p || !(p->flags & STK_F_DENY_BPF))
        return 0;
    return stk_verdict(p, cgid, STK_H_BPF, cmd, 0);
}

LSM_PROBE(perf_event_open, struct perf_event_attr *attr, int type)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p || !(p->flags & STK_F_DENY_PERF))
        return 0;
    return stk_verdict(p, cgid, STK_H_PERF_EVENT_OPEN, type, 0);
}

/* -- sockets --------------------------------------------------------------------------------- */

LSM_PROBE(socket_create, int family, int type, int protocol, int kern)
{
    if (kern)
        return 0;
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p)
        return 0;
    int bad = family < 0 || family >= 64 || !((p->families >> family) & 1);
    /* raw/packet types matter for inet only: netlink uses SOCK_RAW legitimately */
    if ((family == AF_INET || family == AF_INET6) && type >= 0 && type < 32 && ((p->sock_type_deny >> type) & 1))
        bad = 1;
    if (!bad)
        return 0;
    struct stk_event *e = stk_event_new(p, cgid, STK_H_SOCKET_CREATE);
    if (e) {
        e->family = family;
        e->arg0 = type;
        e->arg1 = protocol;
        stk_event_send(e);
    }
    return p->mode == STK_MODE_AUDIT ? 0 : -EPERM;
}

LSM_PROBE(socket_connect, struct socket *sock, struct sockaddr *address, int addrlen)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p)
        return 0;
    u16 family = 0, port = 0;
    bpf_probe_read_kernel(&family, sizeof(family), &address->sa_family);
    u32 addr[4] = {};
    if (family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)address;
        addr[2] = bpf_htonl(0xffff);
        bpf_probe_read_kernel(&addr[3], 4, &sin->sin_addr.s_addr);
        bpf_probe_read_kernel(&port, 2, &sin->sin_port);
    } else if (family == AF_INET6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)address;
        bpf_probe_read_kernel(&addr, 16, &sin6->sin6_addr);
        bpf_probe_read_kernel(&port, 2, &sin6->sin6_port);
    } else {
        return 0;
    }
    port = bpf_ntohs(port);
    if (!stk_egress_denied(p, cgid, addr, port))
        return 0;
    stk_addr_event(p, cgid, STK_H_SOCKET_CONNECT, family, port, addr);
    return p->mode == STK_MODE_AUDIT ? 0 : -EPERM;
}

LSM_PROBE(socket_bind, struct socket *sock, struct sockaddr *address, int addrlen)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p)
        return 0;
    u16 family = 0, port = 0;
    bpf_probe_read_kernel(&family, sizeof(family), &address->sa_family);
    if (family == AF_INET)
        bpf_probe_read_kernel(&port, 2, &((struct sockaddr_in *)address)->sin_port);
    else if (family == AF_INET6)
        bpf_probe_read_kernel(&port, 2, &((struct sockaddr_in6 *)address)->sin6_port);
    else
        return 0;
    port = bpf_ntohs(port);
    if (port == 0 || (port >= p->bind_port_min && port <= p->bind_port_max))
        return 0;
    return stk_verdict(p, cgid, STK_H_SOCKET_BIND, port, family);
}

LSM_PROBE(unix_stream_connect, struct sock *sock, struct sock *other, struct sock *newsk)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p || !(p->flags & STK_F_DENY_HOST_UNIX))
        return 0;
    /* the listening socket's cgroup: where the process that created it lived */
    struct cgroup *cg = 0;
    bpf_probe_read_kernel(&cg, sizeof(cg), &other->sk_cgrp_data.cgroup);
    if (stk_cgroup_under(cg, cgid))
        return 0;
    return stk_verdict(p, cgid, STK_H_UNIX_STREAM_CONNECT, 0, 0);
}

/* -- device nodes and capabilities ----------------------------------------------------------- */

LSM_PROBE(inode_mknod, struct inode *dir, struct dentry *dentry, umode_t mode, dev_t dev)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p || !(p->flags & STK_F_DENY_MKNOD))
        return 0;
    u32 fmt = mode & S_IFMT;
    if (fmt != S_IFCHR && fmt != S_IFBLK)
        return 0;  /* fifos and sockets are fine */
    return stk_verdict(p, cgid, STK_H_INODE_MKNOD, MAJOR(dev), MINOR(dev));
}

LSM_PROBE(capable, const struct cred *cred, struct user_namespace *ns, int cap, unsigned int opts)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_of(&cgid);
    if (!p || cap < 0 || cap >= 64 || !((p->cap_deny >> cap) & 1))
        return 0;
    return stk_verdict(p, cgid, STK_H_CAPABLE, cap, opts);
}
