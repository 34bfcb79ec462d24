import sys, traceback
sys.path.insert(0, "/tmp/distribute_lab/scripts")
from common import *
setup_devices(2)
import keras, keras_gradtools
print(keras_gradtools.__file__)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
x, y = data()
for k in (4, 1):
    with strategy.scope():
        model = make_model()
        model.compile(optimizer=keras_gradtools.Adam(accumulation_steps=k, jit_compile=False), loss="mse")
    try:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        print("K=%d OK" % k)
    except Exception as e:
        print("K=%d FAIL %s: %s" % (k, type(e).__name__, str(e)[:1500]))
        tb = traceback.extract_tb(e.__traceback__)
        for fr in tb[-8:]: print("   ", fr.filename.split("site-packages/")[-1], fr.lineno, fr.name)
