/*
 * Bilten dev shim (not Apache Pinot code). Maven Central, as reachable from our machines,
 * serves no org.apache.pinot:pinot-kafka-3.0 artifact, and the newest Pinot whose server is
 * served (0.11.0) only has the Kafka 2.x consumer (kafka-clients 2.8.1). This alias lets the
 * production table config, which names the kafka30 factory, run unchanged on the dev cluster.
 * It is the real Pinot kafka20 consumer under the kafka30 name; nothing else differs.
 */
package org.apache.pinot.plugin.stream.kafka30;

public class KafkaConsumerFactory extends org.apache.pinot.plugin.stream.kafka20.KafkaConsumerFactory {
}
