/*
 * host.c: a host process using libvshm over vshmd's ivshmem socket.
 *
 * Attaches, creates a section, writes it, opens it again and reads it back, grows it,
 * allocates a block, notifies a change, signals an event, locks a mutex, lists the
 * namespace, and closes everything (the namespace handle first: handles keep it alive).
 * Prints one line per step; exits 0 on success, 1 on the first failure.
 *
 *   cc -o host host.c $(pkg-config --cflags --libs --static vshm)
 *   ./host /run/vshm/vshm.sock
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <vshm.h>

static int failed(const char *what, vshm_status st)
{
    const char *name = vshm_status_name(st);
    fprintf(stderr, "%s failed: %s (0x%08X): %s\n", what, name ? name : "?", (unsigned)st,
            vshm_last_error());
    return 1;
}

#define CHECK(what, call)                                                                  \
    do {                                                                                   \
        vshm_status st_ = (call);                                                          \
        if (st_ != VSHM_STATUS_SUCCESS)                                                    \
            return failed(what, st_);                                                      \
    } while (0)

static const char *kind_name(uint32_t kind)
{
    switch (kind) {
    case VSHM_KIND_SECTION:
        return "section";
    case VSHM_KIND_EVENT:
        return "event";
    case VSHM_KIND_MUTEX:
        return "mutex";
    default:
        return "unknown";
    }
}

static bool print_object(void *ctx, const vshm_object_info *info)
{
    size_t *ours = ctx;
    if (info->name != NULL && strncmp(info->name, "capi-demo", 9) == 0) {
        printf("listed %s %s (%llu bytes)\n", kind_name(info->kind), info->name,
               (unsigned long long)info->size);
        ++*ours;
    }
    return true;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s VSHMD_SOCKET\n", argv[0]);
        return 2;
    }
    static const char message[] = "hello from C";

    vshm_namespace *ns = NULL;
    CHECK("vshm_attach_host", vshm_attach_host(argv[1], &ns));
    uint16_t peer = 0;
    CHECK("vshm_peer_id", vshm_peer_id(ns, &peer));
    printf("attached as peer %u\n", (unsigned)peer);

    /* Create-or-open: 1 MiB reserved, 64 KiB exposed. */
    vshm_section *section = NULL;
    void *address = NULL;
    uint32_t disposition = 0;
    CHECK("vshm_section_create",
          vshm_section_create(ns, "capi-demo", 1 << 20, 64 << 10, false, &section, &address,
                              &disposition));
    uint64_t size = 0, max_size = 0;
    CHECK("vshm_section_size", vshm_section_size(section, &size, &max_size, NULL));
    printf("%s capi-demo (%llu of %llu bytes)\n",
           disposition == VSHM_DISPOSITION_CREATED ? "created" : "opened",
           (unsigned long long)size, (unsigned long long)max_size);

    /* Shared memory: write it with volatile stores (other VMs read it concurrently). */
    volatile char *bytes = address;
    for (size_t i = 0; i < sizeof message; i++)
        bytes[i] = message[i];

    /* A second handle on the same section, by name. */
    vshm_section *again = NULL;
    void *again_address = NULL;
    CHECK("vshm_section_open",
          vshm_section_open(ns, "capi-demo", VSHM_ACCESS_READ_WRITE, &again, &again_address));
    char back[sizeof message] = {0};
    CHECK("vshm_section_read", vshm_section_read(again, 0, back, sizeof back));
    if (memcmp(back, message, sizeof message) != 0) {
        fprintf(stderr, "read back %.*s\n", (int)sizeof back, back);
        return 1;
    }
    printf("opened again: %s\n", back);

    CHECK("vshm_section_grow", vshm_section_grow(section, 128 << 10));
    CHECK("vshm_section_size", vshm_section_size(again, &size, NULL, NULL));
    printf("grown to %llu bytes\n", (unsigned long long)size);

    /* A change notification: the other handle sees it without waiting. */
    CHECK("vshm_section_notify", vshm_section_notify(section));
    uint64_t changes = 0;
    CHECK("vshm_section_wait_change", vshm_section_wait_change(again, 0, &changes));
    printf("changes seen: %llu\n", (unsigned long long)changes);

    /* Blocks inside a (still all-zero) section of their own. */
    vshm_section *heap = NULL;
    void *heap_address = NULL;
    CHECK("vshm_section_create heap",
          vshm_section_create(ns, "capi-demo-heap", 1 << 20, 4096, false, &heap,
                              &heap_address, NULL));
    vshm_block block;
    CHECK("vshm_block_allocate", vshm_block_allocate(heap, 1000, 64, false, &block));
    printf("block of %llu bytes at offset %llu\n", (unsigned long long)block.size,
           (unsigned long long)block.offset);
    CHECK("vshm_block_free", vshm_block_free(heap, &block));

    /* An auto-reset event: signal, then one wait takes the signal. */
    vshm_event *event = NULL, *event2 = NULL;
    CHECK("vshm_event_create",
          vshm_event_create(ns, "capi-demo-event", false, false, &event, NULL));
    CHECK("vshm_event_open", vshm_event_open(ns, "capi-demo-event", &event2));
    CHECK("vshm_event_signal", vshm_event_signal(event));
    CHECK("vshm_event_wait", vshm_event_wait(event2, 1000000000ull));
    vshm_status st = vshm_event_wait(event2, 0);
    if (st != VSHM_STATUS_TIMEOUT)
        return failed("second vshm_event_wait (expected VSHM_STATUS_TIMEOUT)", st);
    printf("event signalled and taken\n");

    /* A robust mutex. */
    vshm_mutex *mutex = NULL;
    CHECK("vshm_mutex_create", vshm_mutex_create(ns, "capi-demo-mutex", false, &mutex, NULL));
    st = vshm_mutex_lock(mutex, VSHM_WAIT_INFINITE);
    if (st != VSHM_STATUS_SUCCESS && st != VSHM_STATUS_ABANDONED)
        return failed("vshm_mutex_lock", st);
    st = vshm_mutex_try_lock(mutex);
    if (st != VSHM_STATUS_POSSIBLE_DEADLOCK)
        return failed("vshm_mutex_try_lock (expected VSHM_STATUS_POSSIBLE_DEADLOCK)", st);
    CHECK("vshm_mutex_unlock", vshm_mutex_unlock(mutex));
    printf("mutex locked and unlocked\n");

    size_t ours = 0, count = 0;
    CHECK("vshm_list", vshm_list(ns, print_object, &ours, &count));
    printf("listed %zu of %zu objects\n", ours, count);

    /* Any order: the namespace handle first; the others keep the namespace alive. */
    CHECK("vshm_detach", vshm_detach(ns));
    CHECK("vshm_section_close", vshm_section_close(section));
    if (((volatile char *)again_address)[0] != 'h') {
        fprintf(stderr, "the second handle lost the section\n");
        return 1;
    }
    CHECK("vshm_section_close again", vshm_section_close(again));
    CHECK("vshm_section_close heap", vshm_section_close(heap));
    CHECK("vshm_event_close", vshm_event_close(event));
    CHECK("vshm_event_close 2", vshm_event_close(event2));
    CHECK("vshm_mutex_close", vshm_mutex_close(mutex));
    printf("closed everything\n");
    return 0;
}
