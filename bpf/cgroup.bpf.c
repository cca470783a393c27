/* cgroup-BPF programs: attached once (BPF_F_ALLOW_MULTI) to the Stockade parent cgroup in the
 * unified hierarchy, so they run only for processes inside containers; the verdict comes from the
 * container's policy (stockade.h). They work where BPF-LSM cannot load.
 *
 * Return value of every program: 1 lets the operation through, 0 makes it fail with EPERM.
 */
#include <uapi/linux/bpf.h>
#include <linux/socket.h>
#include "stockade.h"

/* Attached to the Stockade parent, these programs run only in its subtree: no root check. */
static __always_inline struct stk_policy *stk_policy_cg(u64 *cgid)
{
    return stk_policy_lookup(cgid, 0);
}

/* socket(): family allow-list and denied types. The kernel runs this hook for AF_INET and
 * AF_INET6 sockets only; other families (AF_PACKET, AF_NETLINK...) are the LSM's job. */
int stk_sock_create(struct bpf_sock *ctx)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_cg(&cgid);
    if (!p)
        return 1;
    u32 family = ctx->family, type = ctx->type, protocol = ctx->protocol;
    int bad = 0;
    if (family < 64 && !((p->families >> family) & 1))
        bad = 1;
    if (type < 32 && ((p->sock_type_deny >> type) & 1))
        bad = 1;
    if (!bad)
        return 1;
    struct stk_event *e = stk_event_new(p, cgid, STK_H_SOCK_CREATE);
    if (e) {
        e->family = family;
        e->arg0 = type;
        e->arg1 = protocol;
        stk_event_send(e);
    }
    return p->mode == STK_MODE_AUDIT;
}

/* Egress decision for one destination ADDR (v4 mapped into v6, network byte order). */
static __always_inline int stk_egress(struct stk_policy *p, u64 cgid, const u32 *addr, u32 port,
                                      u32 hook, u32 family)
{
    if (!stk_egress_denied(p, cgid, addr, port))
        return 1;
    stk_addr_event(p, cgid, hook, family, port, addr);
    return p->mode == STK_MODE_AUDIT;
}

static __always_inline int stk_addr4(struct bpf_sock_addr *ctx, u32 hook)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_cg(&cgid);
    if (!p)
        return 1;
    u32 addr[4] = {0, 0, bpf_htonl(0xffff), ctx->user_ip4};
    return stk_egress(p, cgid, addr, bpf_ntohs(ctx->user_port), hook, AF_INET);
}

static __always_inline int stk_addr6(struct bpf_sock_addr *ctx, u32 hook)
{
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_cg(&cgid);
    if (!p)
        return 1;
    u32 addr[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
    return stk_egress(p, cgid, addr, bpf_ntohs(ctx->user_port), hook, AF_INET6);
}

int stk_connect4(struct bpf_sock_addr *ctx) { return stk_addr4(ctx, STK_H_CONNECT4); }
int stk_connect6(struct bpf_sock_addr *ctx) { return stk_addr6(ctx, STK_H_CONNECT6); }
int stk_sendmsg4(struct bpf_sock_addr *ctx) { return stk_addr4(ctx, STK_H_SENDMSG4); }
int stk_sendmsg6(struct bpf_sock_addr *ctx) { return stk_addr6(ctx, STK_H_SENDMSG6); }

/* /proc/sys writes (reads pass). */
int stk_sysctl(struct bpf_sysctl *ctx)
{
    if (!ctx->write)
        return 1;
    u64 cgid = 0;
    struct stk_policy *p = stk_policy_cg(&cgid);
    if (!p || !(p->flags & STK_F_DENY_SYSCTL_WRITE))
        return 1;
    struct stk_event *e = stk_event_new(p, cgid, STK_H_SYSCTL);
    if (e) {
        bpf_sysctl_get_name(ctx, e->object, sizeof(e->object), 0);
        stk_event_send(e);
    }
    return p->mode == STK_MODE_AUDIT;
}
