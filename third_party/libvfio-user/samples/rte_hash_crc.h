/*
 * LOCAL SUBSTITUTE for samples/rte_hash_crc.h.
 *
 * Upstream libvfio-user vendors DPDK's rte_hash_crc.h (table-driven CRC32C,
 * BSD-3-Clause, Intel) for use by the sample client/server only. The stored
 * copy was not transcribed here; this is a minimal bitwise CRC32C (Castagnoli,
 * reflected polynomial 0x82F63B78) with the same calling convention as
 * rte_hash_crc(): no pre/post inversion, caller supplies the initial value.
 * It yields the same values as DPDK's software implementation.
 */

#ifndef _RTE_HASH_CRC_H_
#define _RTE_HASH_CRC_H_

#include <stdint.h>
#include <stddef.h>

static inline uint32_t
rte_hash_crc(const void *data, uint32_t data_len, uint32_t init_val)
{
    const uint8_t *p = data;
    uint32_t crc = init_val;
    uint32_t i;
    int k;

    for (i = 0; i < data_len; i++) {
        crc ^= p[i];
        for (k = 0; k < 8; k++) {
            crc = (crc >> 1) ^ (0x82F63B78U & (0U - (crc & 1U)));
        }
    }
    return crc;
}

#endif /* _RTE_HASH_CRC_H_ */
