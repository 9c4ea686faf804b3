/* Bilten dev shim (not Confluent code); see SchemaRegistryClient.java. */
package io.confluent.kafka.schemaregistry.client;

import io.confluent.kafka.schemaregistry.client.rest.RestService;
import java.io.IOException;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.Map;
import org.apache.avro.Schema;

public class CachedSchemaRegistryClient implements SchemaRegistryClient {
  private final RestService _restService;
  private final Map<Integer, Schema> _byId;

  public CachedSchemaRegistryClient(RestService restService, int identityMapCapacity, Map<String, ?> configs) {
    _restService = restService;
    if (configs != null) {
      restService.configure(configs);  // credentials, as Confluent's client does
    }
    final int capacity = Math.max(1, identityMapCapacity);
    _byId = Collections.synchronizedMap(new LinkedHashMap<Integer, Schema>(16, 0.75f, true) {
      @Override
      protected boolean removeEldestEntry(Map.Entry<Integer, Schema> eldest) {
        return size() > capacity;
      }
    });
  }

  public CachedSchemaRegistryClient(RestService restService, int identityMapCapacity) {
    this(restService, identityMapCapacity, Collections.<String, Object>emptyMap());
  }

  public CachedSchemaRegistryClient(String baseUrls, int identityMapCapacity) {
    this(new RestService(baseUrls), identityMapCapacity);
  }

  @Override
  public Schema getById(int id) throws IOException {
    Schema schema = _byId.get(id);
    if (schema == null) {
      schema = new Schema.Parser().parse(_restService.getSchemaString(id));
      _byId.put(id, schema);
    }
    return schema;
  }
}
